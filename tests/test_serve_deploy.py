"""What a deployment of ``gptoss serve`` needs: a served model name, CORS, /metrics, the limits
as options. The command runs as a user runs it (a subprocess on a free port); /metrics is parsed
with Prometheus's own client library."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import SERVED_MODEL as MODEL, launch_serve  # noqa: E402

ORIGIN = "http://app.example"


def test_served_model_name_cors_and_max_body_from_the_command_line(tiny_hf_single):
    proc, startup, url = launch_serve(tiny_hf_single, "--context", "256", "--served-model-name", "tiny-random",
                                      "--cors-origins", f"{ORIGIN}, http://other.example", "--max-body", "64KiB")
    try:
        assert "model tiny-random" in startup
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-random"]
        r = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert r.model == "tiny-random"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=str(tiny_hf_single), messages=[{"role": "user", "content": "hi"}])

        preflight = httpx.options(url + "/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        simple = httpx.get(url + "/models", headers={"Origin": ORIGIN})
        assert simple.headers["access-control-allow-origin"] == ORIGIN
        stranger = httpx.options(url + "/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers

        big = httpx.post(url + "/chat/completions", json={"model": "tiny-random", "messages": [
            {"role": "user", "content": "x" * 70_000}]})
        assert big.status_code == 413 and "65,536 bytes" in big.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(20)


def test_metrics_in_prometheus_text_format(served, client):
    parser = pytest.importorskip("prometheus_client.parser")
    server, url = served
    base = url.removesuffix("/v1")

    def scrape() -> dict:
        r = httpx.get(base + "/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        out = {}
        for family in parser.text_string_to_metric_families(r.text):
            for s in family.samples:
                out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
        return out
    before = scrape()
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                        stream=True))      # [DONE] comes after the worker recorded it all
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=9)
    after = scrape()

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)
    chat = (("route", "/v1/chat/completions"), ("status", "200"))
    assert grew("gptoss:requests_total", chat) == 2
    assert grew("gptoss:requests_total", (("route", "/v1/chat/completions"), ("status", "400"))) == 1
    assert grew("gptoss:generation_tokens_total") >= 6 and grew("gptoss:prompt_tokens_total") > 0
    assert grew("gptoss:time_to_first_token_seconds_count") == 2
    assert grew("gptoss:inter_token_latency_seconds_count") >= 5
    assert grew("gptoss:e2e_request_latency_seconds_count") == 2
    assert after[("gptoss:time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == \
        after[("gptoss:time_to_first_token_seconds_count", ())]
    assert ("gptoss:num_requests_waiting", ()) in after and after[("gptoss:slots", ())] == 1
