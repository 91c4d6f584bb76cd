"""Exports through the service: POST /models/{id}/exports as a job that writes a GGUF file (or an ONNX folder),
measures it in llama.cpp (onnxruntime-genai) and serves it in the sibling repository `cbd/<id>-GGUF`
(`cbd/<id>-ONNX`); a family the ONNX builder lacks is a 422; and llama.cpp's own `-hf` download sequence
(common/hf-cache.cpp and common/download.cpp of the llama.cpp that the xllamacpp wheel pins) replayed against it."""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import make_tiny_model
from tests.service.conftest import DOLLY, make_settings, run_pending
from tests.service.test_api import make_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def bpe_anchors(tmp_path: Path, smollm2: Path, small_hidden: int) -> tuple[Path, Path]:
    """Two llama anchors (hidden 64 and `small_hidden`) with SmolLM2's byte-level BPE tokenizer (a GGUF file carries
    one) and room for the validation rows (llama.cpp caps its context at the model's positions)."""
    large = make_tiny_model(tmp_path / "large", "llama", seed=1, vocab_size=49152, max_position_embeddings=512)
    small = make_tiny_model(tmp_path / "small", "llama", seed=2, hidden_size=small_hidden, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,
                            max_position_embeddings=512)
    for folder in (large, small):
        (folder / "special_tokens_map.json").unlink(missing_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copy(smollm2 / name, folder / name)
    return large, small


@pytest.fixture
def tiny_anchors(tmp_path: Path, smollm2: Path) -> tuple[Path, Path]:
    """The service tests' two llama anchors, as a GGUF file carries them."""
    return bpe_anchors(tmp_path, smollm2, small_hidden=48)


def ready_model(client: TestClient, settings: Settings, tiny_anchors: tuple[Path, Path]) -> dict:
    """A ready model (alpha 0.5) of a chain that registers the two anchors as they are."""
    large, small = tiny_anchors
    body = {"name": "bpe", "source": str(large), "anchors": [{"checkpoint": str(small), "distill": False}],
            "device": "cpu", "dataset": {"path": str(DOLLY)}}
    chain = client.post("/chains", json=body)
    assert chain.status_code == 202, chain.text
    assert run_pending(settings) == ["succeeded"]
    return make_model(client, settings, client.get(f"/chains/{chain.json()['id']}").json(), alpha=0.5)


def export(client: TestClient, settings: Settings, model_id: str, quant: str, fmt: str = "gguf") -> dict:
    """Export and run the job; ONNX's quantization is named by its own word, `precision`."""
    body = {"format": fmt, "precision" if fmt == "onnx" else "quant": quant}
    response = client.post(f"/models/{model_id}/exports", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == response.json()["job"]["url"]
    assert run_pending(settings) == ["succeeded"]
    return client.get(f"/models/{model_id}/exports/{response.json()['id']}").json()


def test_an_export_is_a_measured_file_of_a_sibling_repository(client: TestClient, settings: Settings,
                                                              tiny_anchors: tuple[Path, Path]) -> None:
    model = ready_model(client, settings, tiny_anchors)
    before = client.get(f"/api/models/cbd/{model['id']}").json()
    assert client.get(f"/api/models/cbd/{model['id']}-GGUF").status_code == 404  # no export yet

    made = export(client, settings, model["id"], "Q8_0")
    assert made["status"] == "ready" and made["hub_repo_id"] == f"cbd/{model['id']}-GGUF"
    assert [f["name"] for f in made["files"]] == ["model-Q8_0.gguf"]
    metrics = made["metrics"]
    # measured in llama.cpp on the chain's validation rows, beside the model's own (transformers) loss
    assert metrics["validation_loss"] == pytest.approx(model["metrics"]["validation_loss"], abs=0.05)
    assert metrics["model_validation_loss"] == model["metrics"]["validation_loss"]
    assert len(metrics["samples"]) == 3 and metrics["size_bytes"] == made["files"][0]["size"]
    body = client.get(made["files"][0]["url"]).content
    assert hashlib.sha256(body).hexdigest() == made["files"][0]["sha256"] and body[:4] == b"GGUF"

    again = client.post(f"/models/{model['id']}/exports", json={"quant": "Q8_0"})
    assert again.status_code == 200 and again.json()["id"] == made["id"]
    export(client, settings, model["id"], "F16")
    sibling = client.get(f"/api/models/cbd/{model['id']}-GGUF").json()
    assert sorted(s["rfilename"] for s in sibling["siblings"]) == ["model-F16.gguf", "model-Q8_0.gguf"]
    assert client.get(f"/api/models/cbd/{model['id']}").json()["sha"] == before["sha"]  # the model's own revision
    assert [e["quant"] for e in client.get(f"/models/{model['id']}/exports").json()] == ["Q8_0", "F16"]
    assert client.get(f"/jobs/{made['job']['id']}").json()["result"]["export"] == made["id"]

    bad = client.post(f"/models/{model['id']}/exports", json={"format": "gguf", "quant": "Q3_K"})
    assert bad.status_code == 422 and "quant" in bad.text
    assert client.post("/models/mdl_none/exports", json={}).status_code == 404
    assert client.delete(f"/models/{model['id']}").status_code == 204
    assert client.get(f"/api/models/cbd/{model['id']}-GGUF").status_code == 404


def test_an_onnx_export_is_a_folder_of_its_sibling_repository_that_onnxruntime_genai_runs(
        client: TestClient, settings: Settings, tiny_anchors: tuple[Path, Path], tmp_path: Path) -> None:
    from cbd_engine.export.ortgenai import ort_genai

    model = ready_model(client, settings, tiny_anchors)
    made = export(client, settings, model["id"], "fp32", fmt="onnx")
    assert (made["status"], made["format"], made["quant"]) == ("ready", "onnx", "fp32")
    assert made["hub_repo_id"] == f"cbd/{model['id']}-ONNX"
    names = [f["name"] for f in made["files"]]
    assert {"fp32/model.onnx", "fp32/model.onnx.data", "fp32/genai_config.json", "fp32/tokenizer.json"} <= set(names)
    metrics = made["metrics"]
    # measured in onnxruntime-genai on the chain's validation rows, beside the model's own (transformers) loss
    assert metrics["validation_loss"] == pytest.approx(model["metrics"]["validation_loss"], abs=0.05)
    assert len(metrics["samples"]) == 3 and metrics["size_bytes"] == sum(f["size"] for f in made["files"])
    for item in made["files"]:  # every file downloads, content-addressed, into the folder onnxruntime-genai loads
        body = client.get(item["url"]).content
        assert hashlib.sha256(body).hexdigest() == item["sha256"]
        (tmp_path / "pulled" / item["name"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pulled" / item["name"]).write_bytes(body)
    sibling = client.get(f"/api/models/cbd/{model['id']}-ONNX").json()
    assert sorted(s["rfilename"] for s in sibling["siblings"]) == sorted(names) and "onnx" in sibling["tags"]
    with ort_genai(tmp_path / "pulled" / "fp32") as runtime:
        assert len(runtime.greedy([1, 9690, 198], 4)) == 4 and runtime.chat("Hello", 4)

    again = client.post(f"/models/{model['id']}/exports", json={"format": "onnx", "quant": "fp32"})
    assert again.status_code == 200 and again.json()["id"] == made["id"]  # precision and quant name one export
    for body, words in [({"format": "onnx", "quant": "Q8_0"}, "onnx quant must be one of fp32, int4"),
                        ({"format": "gguf", "precision": "int4"}, "precision is for onnx exports"),
                        ({"format": "onnx", "quant": "fp32", "precision": "int4"}, "give one")]:
        bad = client.post(f"/models/{model['id']}/exports", json=body)
        assert bad.status_code == 422 and words in bad.text, bad.text


def test_an_onnx_export_of_a_family_the_builder_lacks_is_a_422_that_names_the_supported_ones(
        client: TestClient, settings: Settings, tmp_path: Path) -> None:
    # positions for the calibration rows' 512 tokens (GPT-2's learned positions end at n_positions; the alpha
    # search does not cut rows to them)
    large = make_tiny_model(tmp_path / "large", "gpt2", seed=1, n_positions=512)
    small = make_tiny_model(tmp_path / "small", "gpt2", seed=2, n_embd=48, n_inner=64, n_layer=2, n_head=3,
                            n_positions=512)
    body = {"name": "gpt2", "source": str(large), "anchors": [{"checkpoint": str(small), "distill": False}],
            "device": "cpu"}  # no data set: the refusal needs only a ready model
    chain = client.post("/chains", json=body)
    assert chain.status_code == 202, chain.text
    assert run_pending(settings) == ["succeeded"]
    model = make_model(client, settings, client.get(f"/chains/{chain.json()['id']}").json())
    refused = client.post(f"/models/{model['id']}/exports", json={"format": "onnx", "precision": "int4"})
    assert refused.status_code == 422, refused.text
    assert "Llama family (llama, mistral, qwen2, qwen3), not 'gpt2'" in refused.json()["detail"]
    assert client.get(f"/models/{model['id']}/exports").json() == []  # no export row, no job
    assert client.get("/jobs", params={"kind": "export_model"}).json()["items"] == []


@pytest.fixture
def open_server(tmp_path: Path) -> tuple[str, Settings]:
    """The app on a real socket, auth off (the embedded default), as llama.cpp reaches it."""
    settings = make_settings(tmp_path)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/", settings
    server.should_exit = True
    thread.join(5)


def test_llama_cpp_pulls_an_export_with_its_own_request_sequence(open_server: tuple[str, Settings],
                                                                 tiny_anchors: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    """`MODEL_ENDPOINT=<endpoint> llama-cli -hf cbd/<alias>-GGUF:Q8_0`, as llama.cpp sends it: GET refs (the branch
    `main` and its 40-hex commit), GET the tree at that commit (recursive), the file whose name matches the tag
    (`Q8_0[.-]`), HEAD on its resolve URL (2xx, ETag, Content-Length, Accept-Ranges), then GET, resumed with a
    Range after an interrupted first try. Through an alias of the model: the repository `cbd/<id>-GGUF` itself."""
    endpoint, settings = open_server
    headers = {"User-Agent": "llama-cpp/b8929", "Accept": "application/json"}
    with TestClient(create_app(settings)) as client:
        model = ready_model(client, settings, tiny_anchors)
        made = export(client, settings, model["id"], "Q8_0")
        export(client, settings, model["id"], "F16")
        assert client.put(f"/models/{model['id']}/aliases/edge").status_code == 201
    repo = "cbd/edge-GGUF"
    with httpx.Client(headers=headers, follow_redirects=False) as http:
        refs = http.get(f"{endpoint}api/models/{repo}/refs").json()
        main = next(b for b in refs["branches"] if b["name"] == "main")
        commit = main["targetCommit"]
        assert re.fullmatch(r"[0-9a-f]{40}", commit)
        assert http.get(f"{endpoint}api/models/cbd/{model['id']}-GGUF/refs").json() == refs
        tree = http.get(f"{endpoint}api/models/{repo}/tree/{commit}?recursive=true").json()
        files = [f for f in tree if f["type"] == "file"]
        chosen = next(f for f in files if re.search("Q8_0[.-]", f["path"], re.IGNORECASE))
        assert chosen["path"] == "model-Q8_0.gguf" and re.fullmatch(r"[0-9a-f]{64}", chosen["lfs"]["oid"])
        url = f"{endpoint}{repo}/resolve/{commit}/{chosen['path']}"
        head = http.head(url)
        assert 200 <= head.status_code < 300 and head.headers["accept-ranges"] != "none"
        size = int(head.headers["content-length"])
        first = http.get(url, headers={"Range": "bytes=0-1023"}).content  # an interrupted download's part
        rest = http.get(url, headers={"Range": f"bytes={len(first)}-"})
        assert rest.status_code == 206
    body = first + rest.content
    assert len(body) == size and hashlib.sha256(body).hexdigest() == chosen["lfs"]["oid"] == made["files"][0]["sha256"]
    assert head.headers["etag"].strip('"') == chosen["lfs"]["oid"]
    path = tmp_path / "pulled.gguf"
    path.write_bytes(body)
    from cbd_engine.export.llamacpp import llama_cpp

    with llama_cpp(path) as runtime:
        assert len(runtime.greedy([1, 9690, 198], 4)) == 4


def test_the_model_cards_onnx_runtime_snippet_runs_an_int4_export_pulled_from_the_factory(
        open_server: tuple[str, Settings], tiny_anchors: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The README.md's ONNX Runtime code, as a user copies it (FACTORY replaced by this server): snapshot_download
    of the `int4/` folder of `cbd/<id>-ONNX`, then onnxruntime-genai generates through its chat template."""
    endpoint, settings = open_server
    with TestClient(create_app(settings)) as client:
        model = ready_model(client, settings, tiny_anchors)
        made = export(client, settings, model["id"], "int4", fmt="onnx")
        readme = next(f for f in model["files"] if f["name"] == "README.md")
        card = client.get(readme["url"]).text
    assert made["status"] == "ready" and all(f["name"].startswith("int4/") for f in made["files"])
    snippet = card.split("ONNX Runtime")[1].split("```python\n")[1].split("```")[0]
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    names = {}
    exec(snippet.replace("http://FACTORY:8000", endpoint.rstrip("/")), names)  # the card's own code
    printed = capsys.readouterr().out  # the decoded sequence: the templated prompt, then the model's tokens
    assert "Hello!" in printed and "assistant" in printed
    folder = Path(names["folder"])  # the snapshot: exactly the export's files
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        sorted(f["name"] for f in made["files"])
