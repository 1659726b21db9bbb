"""`bentoml build` packages the service offline from bentofile.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def build(home: Path, name: str, *options: str) -> Path:
    """`bentoml build` offline into `home`; the Bento's directory."""
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run(
        [bentoml, "build", *options, str(ROOT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (bento,) = [p for p in (home / "bentos" / name).iterdir() if p.name != "latest"]
    return bento


def test_bentoml_build_offline(tmp_path: Path) -> None:
    bento = build(tmp_path, "lorafleet")
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "serving.http.service:LoraFleet"
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/feedback"):
        assert path in manifest["schema"]["paths"], path
    assert (bento / "src" / "serving" / "engines" / "hf.py").is_file()
    assert not (bento / "src" / "tests").exists()
    # The image also runs the retraining CronJob (`python -m registry jobs run`).
    wanted = (bento / "env" / "python" / "requirements.in").read_text()
    for package in ("scipy", "datasets", "croniter", "matplotlib"):
        assert package in wanted, package
    assert (bento / "src" / "registry" / "__main__.py").is_file()


def test_the_gpu_bento_builds_offline_with_vllm_on_a_cuda_image(tmp_path: Path) -> None:
    bento = build(tmp_path, "lorafleet-gpu", "-f", "deploy/bento/bentofile.gpu.yaml")
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "serving.http.service:LoraFleet"
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:12.8" in dockerfile
    wanted = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    names = {line.split(">")[0].split("=")[0].split("[")[0] for line in wanted if line}
    assert {"vllm", "psycopg", "s3fs", "datasets", "peft"} <= names
    assert "torch" not in names  # vLLM's own CUDA build
    assert (bento / "src" / "serving" / "engines" / "vllm.py").is_file()
    assert not (bento / "src" / "tests").exists()
