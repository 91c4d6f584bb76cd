"""A thin Python client over the service's REST API (only httpx; no torch).

    from cbd_client import Client
    client = Client("http://127.0.0.1:8000", token="cbd_...")
    model = client.materialize(source="HuggingFaceTB/SmolLM2-135M-Instruct", size="100M")
    folder = client.download(model["id"], "./smollm2-100M")   # then AutoModelForCausalLM.from_pretrained(folder)
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import httpx

FINISHED = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """A problem+json answer: `status` and the service's `detail`."""

    def __init__(self, status: int, detail: str, problem: dict[str, Any]):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail, self.problem = status, detail, problem


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60):
        token = token or os.environ.get("CBD_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            problem = response.json() if "json" in response.headers.get("content-type", "") else {}
            raise ApiError(response.status_code, problem.get("detail", response.text), problem)
        return response.json() if response.content else None

    def create_chain(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/chains", json=spec, headers=headers)

    def chain(self, chain_id: str) -> dict[str, Any]:
        return self._call("GET", f"/chains/{chain_id}")

    def create_model(self, idempotency_key: str | None = None, **request: Any) -> dict[str, Any]:
        """POST /models: `source` or `chain`, `size`, `shape` or `fits` (a memory budget: {"memory": "300MB",
        "quant": "Q8_0", "context": 2048}), and alpha, mix, heal, init, seed, dtype, device."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/models", json=request, headers=headers)

    def model(self, model_id: str) -> dict[str, Any]:
        return self._call("GET", f"/models/{model_id}")

    def set_alias(self, model_id: str, name: str) -> dict[str, Any]:
        """Point the alias at a ready model (moving it from where it pointed); then `cbd/<name>` is that model."""
        return self._call("PUT", f"/models/{model_id}/aliases/{name}")

    def alias(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/aliases/{name}")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def wait(self, job_id: str, interval: float = 0.5, timeout: float | None = None) -> dict[str, Any]:
        """Poll a job until it finishes; raises ApiError-like RuntimeError when it did not succeed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in FINISHED:
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(interval)

    def materialize(self, **request: Any) -> dict[str, Any]:
        """POST /models and wait until the model is ready (an identical earlier request returns at once)."""
        model = self.create_model(**request)
        while model["status"] not in ("ready", "failed", "cancelled"):
            time.sleep(0.5)
            model = self.model(model["id"])
        if model["status"] != "ready":
            job = self.job(model["job"]["id"]) if model.get("job") else {}
            raise RuntimeError(f"model {model['id']} {model['status']}: {job.get('error')}")
        return model

    def download(self, model_id: str, folder: str | Path) -> Path:
        """Every file of a ready model into `folder`, each checked against its sha256."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for item in self.model(model_id)["files"]:
            digest, target = hashlib.sha256(), folder / Path(item["name"]).name
            with self.http.stream("GET", item["url"], follow_redirects=True) as response, open(target, "wb") as out:
                response.raise_for_status()
                for chunk in response.iter_bytes(4 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != item["sha256"]:
                raise ValueError(f"{item['name']}: sha256 mismatch")
        return folder
