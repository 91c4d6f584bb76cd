"""A chain that really prunes and distills, built through the API by the worker's task code, then used."""

from pathlib import Path

from fastapi.testclient import TestClient

from app.settings import Settings
from tests.conftest import DOLLY
from tests.service.conftest import run_pending


def test_posted_chain_prunes_distills_and_serves_models(client: TestClient, settings: Settings,
                                                        tiny_anchors: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch) -> None:
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))  # the teacher-output cache goes there
    large, _ = tiny_anchors
    body = {"name": "distilled", "source": str(large), "device": "cpu",
            "anchors": [{"shape": {"num_layers": 2, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1,
                                   "head_dim": 16, "intermediate_size": 64}}],
            "dataset": {"path": str(DOLLY), "prompt_format": "alpaca"},
            "distillation": {"loss": "reverse_kl", "mode": "off_policy", "steps": 3, "batch_size": 2,
                             "max_length": 64, "learning_rate": 1e-3, "seed": 0, "teacher_cache": 16}}
    response = client.post("/chains", json=body)
    assert response.status_code == 202, response.text
    assert run_pending(settings) == ["succeeded"]
    chain = client.get(f"/chains/{response.json()['id']}").json()
    assert chain["status"] == "ready" and [a["index"] for a in chain["anchors"]] == [0, 1]
    anchor = chain["anchors"][1]
    assert anchor["shape"]["num_layers"] == 2 and anchor["params"] < chain["anchors"][0]["params"]
    assert anchor["metrics"]["validation_loss"] > 0
    assert {"model.safetensors", "config.json", "cbd.json"} <= {f["name"] for f in anchor["files"]}
    assert len(list((tmp_path / "cache" / "teacher-outputs").iterdir())) == 1  # distilled from the cached top-16
    assert not (settings.work_dir / "chains" / chain["id"]).exists()  # no second copy of the stored anchors

    size = (anchor["params"] + chain["anchors"][0]["params"]) // 2
    model = client.post("/models", json={"chain": chain["id"], "size": size, "dtype": "float32"})
    assert model.status_code == 202, model.text
    assert run_pending(settings) == ["succeeded"]
    ready = client.get(f"/models/{model.json()['id']}").json()
    assert ready["status"] == "ready" and ready["metrics"]["validation_loss"] > 0
    assert ready["provenance"]["alignment"]["method"] == "lineage"  # the anchor was cut from the source here
