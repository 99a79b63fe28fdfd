"""The Docker image, compose file and RayJob manifest lint clean and pin what pyproject.toml pins."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([str(BIN / "hadolint"), str(REPO / "docker/Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_and_rayjob_pass_yamllint():
    proc = subprocess.run([str(BIN / "yamllint"), "-d", "{extends: relaxed, rules: {line-length: {max: 120}}}",
                           str(REPO / "docker/compose.yaml"), str(REPO / "docker/rayjob.yaml"),
                           str(REPO / "docker/rayjob-gpu.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_images_pin_the_versions_pyproject_pins():
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    ray_pin = re.search(r'"ray\[default\]==([\d.]+)"', pyproject).group(1)
    assert f"torch=={torch_pin}" in (REPO / "docker/Dockerfile").read_text()
    for manifest in ("rayjob.yaml", "rayjob-gpu.yaml"):
        assert f'rayVersion: "{ray_pin}"' in (REPO / "docker" / manifest).read_text()


def test_rayjob_manifests_create_their_volume_and_name_the_image_the_dockerfile_builds():
    import yaml

    for manifest, image in (("rayjob.yaml", "raylane:cpu"), ("rayjob-gpu.yaml", "raylane:gpu")):
        text = (REPO / "docker" / manifest).read_text()
        claim, job = list(yaml.safe_load_all(text))
        assert claim["kind"] == "PersistentVolumeClaim" and job["kind"] == "RayJob"
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert f"-t {image} ." in text and all(c["image"] == image for c in head["containers"])


def test_compose_publishes_every_port_on_loopback_only():
    import yaml

    services = yaml.safe_load((REPO / "docker/compose.yaml").read_text())["services"]
    published = [str(p) for s in services.values() for p in s.get("ports", [])]
    assert published, "the head should publish the dashboard port"
    assert all(p.startswith("127.0.0.1:") for p in published), published
