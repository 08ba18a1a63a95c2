"""The GPU image, checked statically (no docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "containers" / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_image_is_pinned_ngc_pytorch():
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", froms[0]), froms[0]


def test_no_secret_build_args_or_env():
    for word, rest in instructions():
        if word in ("ARG", "ENV"):
            assert not re.search(r"(TOKEN|KEY|SECRET|PASSWORD|PASS)\b", rest.upper()), rest


IMAGE_RECORD = ROOT / "constraints" / "ngc-pytorch-25.09.toml"
LOCK = ROOT / "constraints" / "gpu-ngc25.09.txt"


def lock_problems(lock_text: str, pyproject_text: str, image: dict, dockerfile: str) -> list[str]:
    """Why the GPU lock would not install as one consistent environment on the image (empty: it would).

    - every line pins one exact version (`name==version`, no ranges, no URLs);
    - nothing the image provides is pinned (its torch stays the one every package was resolved against), and the
      lock was resolved against the public release of the image's torch series;
    - every requirement of pyproject.toml (dependencies + the `gpu` extra) and of constraints/gpu.in is satisfied by
      a pin, or by the image, or is vLLM, which the Dockerfile builds at the lock's recorded version.
    """
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    problems: list[str] = []
    pins: dict[str, Version] = {}
    for n, line in enumerate(lock_text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if req.url or len(spec) != 1 or spec[0].operator != "==":
            problems.append(f"lock line {n}: {line!r} is not an exact pin")
            continue
        pins[canonicalize_name(req.name)] = Version(spec[0].version)
    header = dict(re.findall(r"^# ([a-z-]+): (\S+)$", lock_text, re.M))
    never = {canonicalize_name(x) for x in image["never_from_pypi"]["names"]}
    provided = {canonicalize_name(k): v for k, v in image["packages"].items()}
    for name in sorted(set(pins) & (never | set(provided))):
        problems.append(f"lock pins {name}=={pins[name]}, which the image provides (it must stay the image's own)")
    image_torch = Version(image["packages"]["torch"])
    if header.get("resolved-with") != f"torch=={image_torch.base_version}":
        problems.append(f"lock was resolved with {header.get('resolved-with')!r}, not the image's torch series "
                        f"torch=={image_torch.base_version} ({image_torch})")
    vllm = Requirement(header.get("built-from-source", "vllm"))
    env = {"python_version": image["python"], "python_full_version": image["python"] + ".0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
    project = tomllib.loads(pyproject_text)["project"]
    gpu_in = (ROOT / "constraints" / "gpu.in").read_text()
    wanted = [*project["dependencies"], *project["optional-dependencies"]["gpu"],
              *[ln.split("#", 1)[0].strip() for ln in gpu_in.splitlines() if ln.split("#", 1)[0].strip()]]
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if req.marker and not req.marker.evaluate({**env, "extra": ""}):
            continue
        if name == "vllm":
            if not req.specifier.contains(list(vllm.specifier)[0].version if vllm.specifier else "0"):
                problems.append(f"{text!r} but the image builds {vllm}")
            continue
        if name in provided:
            continue
        if name not in pins:
            problems.append(f"{text!r} has no pin in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{text!r} is not satisfied by the lock's {name}=={pins[name]}")
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    if froms != [image["image"]]:
        problems.append(f"Dockerfile FROM {froms} is not the recorded image {image['image']}")
    if vllm.specifier and f"ARG VLLM_VERSION={list(vllm.specifier)[0].version}" not in dockerfile:
        problems.append(f"Dockerfile does not build the lock's {vllm}")
    return problems


def image_record() -> dict:
    import tomllib

    return tomllib.loads(IMAGE_RECORD.read_text())


def test_gpu_lock_is_consistent_with_the_project_and_the_image():
    problems = lock_problems(LOCK.read_text(), (ROOT / "pyproject.toml").read_text(), image_record(), DOCKERFILE)
    assert problems == []


def test_gpu_lock_check_rejects_what_would_not_install():
    lock, pyproject, image = LOCK.read_text(), (ROOT / "pyproject.toml").read_text(), image_record()

    def problems(**changes) -> list[str]:
        return lock_problems(changes.get("lock", lock), pyproject, changes.get("image", image),
                             changes.get("dockerfile", DOCKERFILE))

    old_megatron = re.sub(r"^megatron-core==\S+", "megatron-core==0.15.0", lock, flags=re.M)
    assert any("megatron-core>=0.16.1" in p for p in problems(lock=old_megatron))
    assert any("math-verify" in p and "no pin" in p for p in problems(lock=re.sub(r"^math-verify==.*\n", "", lock,
                                                                                   flags=re.M)))
    assert any("torch==2.9.0, which the image provides" in p for p in problems(lock=lock + "torch==2.9.0\n"))
    assert any("not an exact pin" in p for p in problems(lock=lock + "numpy>=2\n"))
    newer = {**image, "packages": {**image["packages"], "torch": "2.10.0a0+b4e4ee81d3"}}
    assert any("not the image's torch series" in p for p in problems(image=newer))
    assert any("FROM" in p for p in problems(dockerfile=DOCKERFILE.replace("25.09-py3", "25.12-py3")))
    assert any("does not build" in p for p in problems(dockerfile=DOCKERFILE.replace("VLLM_VERSION=0.13.0",
                                                                                    "VLLM_VERSION=0.12.0")))


def test_dockerfile_installs_from_the_lock():
    runs = [rest for word, rest in instructions() if word == "RUN"]
    copies = " ".join(rest for word, rest in instructions() if word == "COPY")
    assert "constraints/gpu-ngc25.09.txt" in copies
    installs = [part.strip() for run in runs for part in run.split("&&") if "pip install" in part]
    assert "pip install --no-deps -r constraints/gpu-ngc25.09.txt" in installs
    # nothing is resolved outside the lock: each install takes it as is, or is constrained by it
    for cmd in installs:
        assert "--no-deps" in cmd or "-c constraints/gpu-ngc25.09.txt" in cmd, cmd
    # vLLM compiled against the image's torch, from the release the lock was resolved for
    assert any("use_existing_torch.py" in run and "--no-build-isolation" in run for run in runs)
    assert "git+https://github.com/NVIDIA/NeMo-Skills.git@" in " ".join(runs)
    assert "import torch, transformer_engine, megatron.core, nemo_curator, nemo_run, vllm, nemo_skills" in " ".join(runs)


def test_build_script_and_usage_note():
    build = (ROOT / "containers" / "build.sh").read_text()
    assert "docker build -f containers/Dockerfile" in build and "enroot import" in build
    readme = (ROOT / "containers" / "README.md").read_text()
    assert "--container-env" in readme and "executor.container_image=" in readme
