"""A vLLM engine in a worker process, for callers that must not host vLLM themselves (evaluation).

vLLM starts engine processes of its own and wants them created under `__main__`, so the engine lives in
`python -m recipes.generation.vllm_worker '<spec json>'` and `VLLMWorkerBackend` talks to it over pipes:
one JSON request per line on stdin ({"prompts", "params"} or {"load": <HF folder>}), one JSON reply per
line on stdout; every log line (ours, vLLM's, its children's) goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from recipes.generation.backend import Completion, Prompt, SamplingParams, on_cpu


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


class VLLMWorkerBackend:
    def __init__(self, model_dir: str | Path, **engine_options):
        """engine_options: `VLLMEngine`'s keyword arguments (JSON values)."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if on_cpu():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a quarter of the machine
            # the engine core in the worker process itself: two fewer process start-ups (each imports vLLM, ~20 s
            # on 2 cores), and generation on every core instead of one core bound to a spawned worker
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.in_process = env.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"  # vLLM's default: its own process
        spec = {"model": str(model_dir), **engine_options}
        self.proc = subprocess.Popen([sys.executable, "-m", "recipes.generation.vllm_worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        try:  # the tokenizer loads while the worker imports vLLM (~20 s on 2 cores), not before it starts
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            reply = self._read()
            if reply.get("status") != "ready":
                raise RuntimeError(f"vLLM worker failed to start: {reply}")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _request(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"vLLM worker exited with code {code} (its log is on stderr above)")
        return json.loads(line)

    def swaps_weights(self, model_dir: str, new_dir: str) -> bool:
        """Whether `load_folder(new_dir)` can replace `model_dir` in the running engine: the engine runs in the
        worker process itself (CPU), and both folders hold the same architecture and tokenizer."""
        if not self.in_process:
            return False
        files = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        try:
            return all(_read_bytes(Path(model_dir, f)) == _read_bytes(Path(new_dir, f)) for f in files)
        except OSError:
            return False

    def load_folder(self, model_dir: str | Path) -> None:
        """Replace the engine's weights with `model_dir`'s safetensors (prefix cache dropped)."""
        reply = self._request({"load": str(model_dir)})
        if reply.get("status") != "loaded":
            raise RuntimeError(f"vLLM worker could not load {model_dir}: {reply.get('error', reply)}")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        reply = self._request({"prompts": prompts, "params": dataclasses.asdict(params)})
        if "error" in reply:
            raise RuntimeError(f"vLLM worker: {reply['error']}")
        return [[Completion(**c) for c in comps] for comps in reply["outputs"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()


def serve(spec: dict) -> None:
    # keep the protocol channel private: fd 1 becomes stderr for vLLM and the processes it starts
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        from recipes.generation.vllm_engine import VLLMEngine

        engine = VLLMEngine(spec.pop("model"), **spec)
    except Exception as err:  # noqa: BLE001 - reported to the caller, which raises
        reply({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        return
    reply({"status": "ready"})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if "load" in req:
                engine.load_folder(req["load"])
                reply({"status": "loaded"})
                continue
            outputs = engine.generate(req["prompts"], SamplingParams(**req["params"]))
            reply({"outputs": [[dataclasses.asdict(c) for c in comps] for comps in outputs]})
        except Exception as err:  # noqa: BLE001
            reply({"error": f"{type(err).__name__}: {err}"})


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
