"""text-embeddings-inference's routes through the nginx front, with httpx as a TEI client would send them: at
the root of a host that serves one model (TEI serves one), and under the model's prefix. Shapes as TEI's API
documents them; answers equal the task JSON route's."""
from __future__ import annotations

import httpx
import numpy as np

TEXTS = ["What is Deep Learning?", "Deep learning is a branch of machine learning."]


def test_tei_routes_at_the_root_and_under_the_model(stack):
    base = stack.front_url
    task = np.asarray(httpx.post(f"{base}/models/emb", json={"inputs": TEXTS}, timeout=60).json())
    normalized = task / np.linalg.norm(task, axis=1, keepdims=True)
    for prefix in ("", "/models/emb"):
        embed = httpx.post(f"{base}{prefix}/embed", json={"inputs": TEXTS}, timeout=60)
        assert embed.status_code == 200 and embed.headers["content-type"].startswith("application/json")
        np.testing.assert_allclose(embed.json(), normalized, atol=1e-5)      # TEI normalizes by default
        [one] = httpx.post(f"{base}{prefix}/embed", json={"inputs": TEXTS[0], "normalize": False}, timeout=60).json()
        np.testing.assert_allclose(one, task[0], atol=1e-5)
        [tokens] = httpx.post(f"{base}{prefix}/tokenize", json={"inputs": TEXTS[0]}, timeout=60).json()
        assert set(tokens[0]) == {"id", "text", "special", "start", "stop"} and tokens[0]["special"]
        info = httpx.get(f"{base}{prefix}/info", timeout=60).json()
        assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 32
        assert httpx.get(f"{base}{prefix}/health", timeout=60).status_code == 200
        ranked = httpx.post(f"{base}{prefix}/rerank", json={"query": TEXTS[0], "texts": TEXTS[::-1]},
                            timeout=60).json()
        assert [r["index"] for r in ranked] == [1, 0] and set(ranked[0]) == {"index", "score"}
    refused = httpx.post(f"{base}/embed", json={"inputs": [""]}, timeout=60)       # TEI: Validation is a 413
    assert refused.status_code == 413 and refused.json()["error_type"] == "Validation"
