"""How zswarm installs itself, and llama.cpp with it: the one place that says how llama.cpp is built.

``python3 -m zswarm.install [PIP-TARGET]`` (the README's first command; tox, ``.ci/run`` and the
Ansible role call the same) builds llama-cpp-python from source with :func:`build_env`, keeps
the wheel in a cache of its own whose key includes the build flags and this CPU, installs it,
proves it (``--check``: the RPC backend is there and a test generation runs in a child process),
and then installs zswarm (``.`` by default, or ``.[test]``).

Why not pip's own cache: pip keys a wheel it built on the source archive alone, ignoring
``CMAKE_ARGS``, so a wheel built without the RPC backend, or for another CPU, comes back on every
reinstall. This module's cache is keyed on everything that changes the binary, and a wheel that
fails its proof is thrown away and built again once.

The build: llama.cpp's ``GGML_NATIVE`` (``-march=native``: the SIMD this CPU has, AVX-512
included) minus AMX on x86-64. Virtual machines advertise AMX in CPUID and XCR0 without being
able to run it, and llama.cpp trusts the advertisement (its issues #28328, #28756): a native
build then dies with SIGILL at the first matrix product. AMX only speeds up large batched
prompt processing on Sapphire Rapids; SmolLM2's decode is memory-bound and does not use it.
Runtime dispatch over all CPU variants (``GGML_CPU_ALL_VARIANTS``) was rejected: it compiles
fourteen copies of the CPU backend (about an hour on 2 cores) and picks its variant from the same
advertisement, AMX included.

This module uses the standard library only: it runs before anything else is installed, and
``zswarm doctor`` imports it to say how to rebuild. It must never import llama_cpp in its own
process (a bad build dies by a signal; only children run it).
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# -mno-amx-*: see the module docstring. GCC honours an explicit -mno-X whatever -march says.
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# The test generation of a check: a few tokens of the embedded model, in a child process.
_CHECK_TIMEOUT_S = 120.0  # a cold start reads 98 MB and compiles nothing; 2 s is usual here
_REPO = Path(__file__).resolve().parent.parent
_SOURCE_TREE = (_REPO / "setup.cfg").is_file()  # run from a checkout, not from site-packages
PIP_ARGS: list[str] = []  # --pip-args: more arguments for every pip call (an index, a proxy)


def llama_pin(setup_cfg: Path = _REPO / "setup.cfg") -> str:
    """The ``llama-cpp-python==X`` requirement, read from setup.cfg so that it is written once."""
    cfg = configparser.ConfigParser()
    if cfg.read(setup_cfg):
        for line in cfg.get("options", "install_requires", fallback="").splitlines():
            if line.strip().lower().replace("_", "-").startswith("llama-cpp-python"):
                return line.strip()
    try:  # an installed zswarm (doctor on a host without the source tree)
        from importlib.metadata import requires

        for line in requires("zswarm") or ():
            if line.lower().replace("_", "-").startswith("llama-cpp-python"):
                return line.split(";")[0].strip()
    except Exception:
        pass
    return "llama-cpp-python==0.3.36"


def _compiler_accepts(flags: str) -> bool:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "t.c")
        src.write_text("int main(void) { return 0; }\n")
        r = subprocess.run([cc, *flags.split(), "-c", str(src), "-o", str(Path(d, "t.o"))],
                           capture_output=True)
        return r.returncode == 0


def build_env(machine: str | None = None, base: dict | None = None) -> dict[str, str]:
    """The environment variables that build llama.cpp the zswarm way on this machine.

    ``CMAKE_ARGS`` turns on the RPC backend (worker mode) and the native build; on x86-64,
    ``CFLAGS``/``CXXFLAGS`` keep AMX out (CMake seeds its flags from them; putting them inside
    ``CMAKE_ARGS`` would need quoting that scikit-build-core splits apart). A compiler too old to
    know AMX (GCC < 11) emits no AMX either, so the flags are then left out.
    """
    machine = (machine or platform.machine()).lower()
    env = {"CMAKE_ARGS": "-DGGML_RPC=ON -DGGML_NATIVE=ON"}
    if machine in ("x86_64", "amd64") and _compiler_accepts(_NO_AMX):
        for var in ("CFLAGS", "CXXFLAGS"):
            prior = (base or os.environ).get(var, "")
            env[var] = f"{prior} {_NO_AMX}".strip()
    return env


def cpu_flags() -> str:
    """The CPU's advertised features (x86 ``flags`` or Arm ``Features``), sorted, for cache keys."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return " ".join(sorted(value.split()))
    return ""


def cache_dir() -> Path:
    base = os.environ.get("ZSWARM_WHEEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zswarm", "wheels")
    return Path(base)


def cache_key(pin: str, env: dict[str, str]) -> str:
    material = json.dumps({"pin": pin, "env": env, "python": sys.version_info[:2],
                           "machine": platform.machine(), "cpu": cpu_flags()}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def rebuild_command() -> str:
    """What a user runs to rebuild llama.cpp for this machine (named in every remedy)."""
    return f"{sys.executable or 'python3'} -m zswarm.install --rebuild"


# ------------------------------------------------------------------------------------- check
_CHECK_CHILD = r"""
import json, sys
out = {}
import llama_cpp
out["version"] = getattr(llama_cpp, "__version__", "?")
out["rpc"] = bool(llama_cpp.llama_supports_rpc())
out["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
print(json.dumps(out), flush=True)
model = sys.argv[1] if len(sys.argv) > 1 else ""
if model:
    llm = llama_cpp.Llama(model_path=model, n_ctx=64, n_threads=1, verbose=False)
    r = llm.create_completion("The sky is", max_tokens=4, temperature=0.0)
    print(json.dumps({"generated": r["choices"][0]["text"]}), flush=True)
"""


def embedded_model() -> str | None:
    """The embedded SmolLM2 GGUF (:func:`zswarm.engine.model.default_model_path`), or None."""
    from .engine.model import ModelMissing, default_model_path  # standard library only

    try:
        return default_model_path()
    except ModelMissing:
        return None


def check(python: str = sys.executable, model: str | None = None,
          timeout_s: float = _CHECK_TIMEOUT_S, env: dict | None = None) -> dict:
    """Prove the installed llama.cpp in a child process: imports, has RPC, runs a generation.

    Returns ``{"ok": bool, "problem": str|None, "version", "rpc", "system_info", "generated",
    "signal"}``; ``problem`` is one line naming what is wrong and how to fix it.
    """
    if model is None:
        model = embedded_model() or ""
    result: dict = {"ok": False, "problem": None, "signal": None}
    try:
        p = subprocess.run([python, "-c", _CHECK_CHILD, model], capture_output=True, text=True,
                           timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        result["problem"] = f"a test generation did not finish in {timeout_s:.0f} s"
        return result
    for line in p.stdout.splitlines():
        try:
            said = json.loads(line)
        except ValueError:
            continue
        if isinstance(said, dict):
            result.update(said)
    fix = f"rebuild it for this machine: {rebuild_command()}"
    if p.returncode < 0:
        import signal as _signal

        name = _signal.Signals(-p.returncode).name
        result["signal"] = name
        what = ("it uses CPU instructions this machine cannot execute (a build for another "
                "CPU, or a feature the CPU advertises but cannot run)") if name == "SIGILL" else \
            "llama.cpp crashed"
        result["problem"] = f"llama.cpp was killed by {name} during a test generation: {what}; {fix}"
    elif result.get("rpc") is False:
        result["problem"] = ("llama-cpp-python was built without the RPC backend (a wheel from "
                             f"pip's cache built without CMAKE_ARGS?); {fix}")
    elif p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named 'llama_cpp'" in p.stderr:
            result["problem"] = f"llama-cpp-python is not installed; {fix}"
        else:
            result["problem"] = f"llama.cpp failed a test generation ({last}); {fix}"
    elif model and "generated" not in result:
        result["problem"] = f"the test generation produced nothing; {fix}"
    elif result.get("version") != llama_pin().split("==")[-1]:
        result["problem"] = (f"llama-cpp-python {result.get('version')} is installed, zswarm needs "
                             f"{llama_pin()}; {fix}")
    else:
        result["ok"] = True
    return result


# ------------------------------------------------------------------------------------- install
def _pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", *PIP_ARGS, *args]
    print("zswarm.install:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build_wheel(python: str, pin: str, env: dict[str, str], into: Path) -> Path:
    """Build llama-cpp-python's wheel into ``into`` (never from or into pip's cache)."""
    into.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=into))
    try:
        cmd = [python, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
               "--no-cache-dir", "--no-binary", "llama-cpp-python", *PIP_ARGS, "-w", str(tmp), pin]
        print("zswarm.install: building llama.cpp (minutes):",
              " ".join(f"{k}={v!r}" for k, v in env.items()), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, **env})
        wheels = list(tmp.glob("llama_cpp_python-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"zswarm.install: expected one wheel in {tmp}, found {wheels}")
        final = into / wheels[0].name
        os.replace(wheels[0], final)  # atomic: a half-built wheel is never in the cache
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_llama(python: str = sys.executable, rebuild: bool = False) -> bool:
    """Install a proven llama-cpp-python into ``python``'s environment.

    A cached wheel that fails its check is built again once; a fresh build that fails is final.
    Returns whether the wheel was built in this call.
    """
    pin = llama_pin()
    env = build_env()
    slot = cache_dir() / cache_key(pin, env)
    while True:
        wheels = sorted(slot.glob("llama_cpp_python-*.whl"))
        fresh = rebuild or not wheels
        if fresh:
            shutil.rmtree(slot, ignore_errors=True)
            wheels = [build_wheel(python, pin, env, slot)]
        # First this exact build over whatever is installed, then its dependencies (pip keeps
        # the build: the version is satisfied).
        _pip(python, "--no-deps", "--force-reinstall", str(wheels[-1]))
        _pip(python, str(wheels[-1]))
        result = check(python)
        if result["ok"]:
            return fresh
        if fresh:
            raise SystemExit(f"zswarm.install: llama.cpp built here does not run here: "
                             f"{result['problem']}")
        print(f"zswarm.install: the cached llama.cpp failed its check ({result['problem']}); "
              "building it again", flush=True)
        rebuild = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m zswarm.install",
                                 description="Install zswarm with a llama.cpp built for this machine.")
    ap.add_argument("target", nargs="?", default=str(_REPO) if _SOURCE_TREE else None,
                    help="what to pip-install after llama.cpp (default: this source tree, when run "
                         "from one; e.g. '.[test]')")
    ap.add_argument("--rebuild", action="store_true",
                    help="build llama.cpp again even if a proven wheel is cached")
    ap.add_argument("--check", action="store_true",
                    help="only prove the installed llama.cpp (exit 1 with the remedy if it fails)")
    ap.add_argument("--llama-only", action="store_true", help="install llama.cpp, not zswarm")
    ap.add_argument("--pip-args", default="", metavar="ARGS",
                    help="more arguments for every pip call, e.g. '--index-url URL'")
    ap.add_argument("--print-env", action="store_true",
                    help="print the build environment (KEY=VALUE lines) and exit")
    args = ap.parse_args(argv)
    import shlex

    PIP_ARGS[:] = shlex.split(args.pip_args)
    if args.target is None:
        args.llama_only = True  # an installed zswarm (e.g. --rebuild on a host): nothing else to install
    if args.print_env:
        for k, v in build_env().items():
            print(f"{k}={v}")
        return 0
    if args.check:
        result = check()
        if not result["ok"]:
            print(f"zswarm: {result['problem']}", file=sys.stderr)
            return 1
        print(f"llama.cpp {result.get('version')} ok: RPC backend, test generation "
              f"{result.get('generated', '')!r}")
        return 0
    try:
        fresh = False
        if args.rebuild or not check()["ok"]:
            fresh = install_llama(rebuild=args.rebuild)
        if not args.llama_only:
            _pip(sys.executable, args.target)
            # The embedded model is installed now: prove a real generation, not just the import.
            final = check()
            if not final["ok"]:
                if fresh:
                    print(f"zswarm: {final['problem']}", file=sys.stderr)
                    return 1
                install_llama(rebuild=True)
    except subprocess.CalledProcessError as e:
        print(f"zswarm.install: {' '.join(map(str, e.cmd[:6]))} … failed with status "
              f"{e.returncode}", file=sys.stderr)
        return 1
    if not args.llama_only:
        _on_path()
    print("zswarm.install: done; llama.cpp proven on this machine", flush=True)
    return 0


def _on_path() -> None:
    """Make the ``zswarm`` command reachable: pyenv's shims need a rehash after ``python -m pip``."""
    if shutil.which("pyenv"):  # always: pyenv puts the version's own bin first on PATH for us
        subprocess.run(["pyenv", "rehash"], check=False)
    if shutil.which("zswarm"):
        return
    import sysconfig

    print(f"zswarm.install: the zswarm command is in {sysconfig.get_path('scripts')}, which is "
          "not on PATH: add it to PATH", flush=True)


if __name__ == "__main__":
    sys.exit(main())
