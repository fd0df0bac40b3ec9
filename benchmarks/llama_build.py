"""Decode speed of zswarm's llama.cpp build against other builds of the same source, on this machine.

    python benchmarks/llama_build.py [--tokens 96] [--rounds 3] [--write]

zswarm's build (``zswarm.install``: native minus AMX) is the installed one. The others are
llama.cpp's CPU backend (``libggml-cpu``) rebuilt from the very source llama-cpp-python ships
(its sdist, from the package registry) with other flags, each dropped into a copy of the
installed ``lib`` folder and loaded through ``LLAMA_CPP_LIB_PATH``:

- ``native``: ``-march=native`` as the CPU advertises it (AMX included where advertised: it dies
  by SIGILL on a VM that advertises AMX it cannot run, which is why zswarm leaves AMX out);
- ``avx2``: llama.cpp's portable default without native (AVX2, FMA, F16C), runs on any x86-64-v3;
- ``avx512``: ``avx2`` plus AVX-512 F/VBMI/VNNI/BF16 (built only where the CPU advertises avx512f).

Each build runs in its own child process: greedy decode of ``--tokens`` tokens of the embedded
model with 2 threads, the builds interleaved round by round (ABCABC) so that drift in a noisy
machine's load falls on all of them alike; the figure is each build's median tokens/s. A build
that dies (SIGILL) is reported as not running here. zswarm's build runs a second time under
another name, so the table shows how far apart two identical builds measure (the noise floor). The aim (issue: portable build): zswarm's
build at ≥ 0.95 of the fastest build that runs. ``--write`` replaces this script's section of
docs/BENCHMARKS.md. Builds are cached in ``~/.cache/zswarm/bench-builds``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
from common import command_line, loadavg, machine, now_utc, publish

from zswarm import install
from zswarm.engine.ggml import lib_dir

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zswarm" / "bench-builds"
AVX512 = "-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
VARIANTS = {  # name -> (cmake flags, extra C/C++ flags)
    "native": ("-DGGML_NATIVE=ON", ""),
    "avx2": ("-DGGML_NATIVE=OFF", ""),
    "avx512": (f"-DGGML_NATIVE=OFF {AVX512}", ""),
}

AGAIN = "zswarm's again (noise floor)"

CHILD = r"""
import json, sys, time
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
prompt = llm.tokenize(b"Write a long story about a lighthouse keeper and the sea.", add_bos=True)
n = int(sys.argv[2])
llm.eval(prompt)
t0 = time.perf_counter()
count = 0
for tok in llm.generate(prompt, temp=0.0, reset=False):
    count += 1
    if count >= n:
        break
dt = time.perf_counter() - t0
print(json.dumps({"tokens_per_s": count / dt}))
"""


def sdist_source() -> Path:
    """llama-cpp-python's sdist (the installed version), unpacked once into the cache."""
    version = install.llama_pin().split("==", 1)[1]
    dest = CACHE / f"llama_cpp_python-{version}"
    if (dest / "vendor" / "llama.cpp").is_dir():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", d, f"llama-cpp-python=={version}"], check=True, capture_output=True)
        [archive] = Path(d).glob("*.tar.gz")
        with tarfile.open(archive) as tf:
            tf.extractall(CACHE, filter="data")
    return dest


def build_variant(name: str, cmake_flags: str, cflags: str) -> Path:
    """A copy of the installed lib folder with this variant's libggml-cpu in it."""
    out = CACHE / f"lib-{name}-{install.cache_key(install.llama_pin(), {'cmake': cmake_flags, 'cflags': cflags})}"
    if (out / "libggml-cpu.so").exists():
        return out
    src = sdist_source() / "vendor" / "llama.cpp"
    build = CACHE / f"build-{name}"
    shutil.rmtree(build, ignore_errors=True)
    env = {**os.environ, "CFLAGS": cflags, "CXXFLAGS": cflags}
    print(f"building libggml-cpu ({name}: {cmake_flags} {cflags})", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    *cmake_flags.split()], check=True, env=env, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "ggml-cpu", "-j", str(os.cpu_count() or 2)],
                   check=True, env=env, capture_output=True)
    [lib] = [p for p in build.rglob("libggml-cpu.so.*") if not p.is_symlink()]
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    for f in Path(lib_dir()).iterdir():
        shutil.copy2(f, tmp / f.name)
    for f in tmp.glob("libggml-cpu.so*"):
        shutil.copy2(lib, f)
    shutil.rmtree(build, ignore_errors=True)
    os.replace(tmp, out)
    return out


def run_once(libdir: Path | None, model: str, tokens: int) -> float | str:
    env = dict(os.environ)
    if libdir is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(libdir)
    p = subprocess.run([sys.executable, "-c", CHILD, model, str(tokens)], capture_output=True, text=True,
                       env=env, timeout=300)
    if p.returncode < 0:
        import signal

        return f"does not run here ({signal.Signals(-p.returncode).name})"
    if p.returncode != 0:
        return f"failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(p.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=96, help="tokens decoded per run [default: 96]")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each build, interleaved [default: 3]")
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    args = ap.parse_args()
    model = install.embedded_model()
    cpu = set(install.cpu_flags().split())
    builds: dict[str, Path | None] = {"zswarm (native minus AMX)": None}
    for name, (flags, cflags) in VARIANTS.items():
        if name == "avx512" and "avx512f" not in cpu:
            continue
        builds[name] = build_variant(name, flags, cflags)
    builds[AGAIN] = None  # zswarm's build once more: the spread between identical builds is the noise
    results: dict[str, list] = {name: [] for name in builds}
    for _ in range(args.rounds):
        for name, libdir in builds.items():
            results[name].append(run_once(libdir, model, args.tokens))
    figures: dict[str, float | str] = {}
    for name, runs in results.items():
        speeds = [r for r in runs if isinstance(r, float)]
        figures[name] = statistics.median(speeds) if len(speeds) == len(runs) else next(
            r for r in runs if isinstance(r, str))
    running = {k: v for k, v in figures.items() if isinstance(v, float) and k != AGAIN}
    ours = figures["zswarm (native minus AMX)"]
    best_name = max(running, key=running.get)
    rows = ["| build | decode tokens/s (median) | vs zswarm's |", "|---|---|---|"]
    for name, v in figures.items():
        rows.append(f"| {name} | {v:.1f} | {v / ours:.2f} |" if isinstance(v, float) and isinstance(ours, float)
                    else f"| {name} | {v} | – |")
    ratio = ours / running[best_name] if isinstance(ours, float) else float("nan")
    verdict = "met" if ratio >= 0.95 else "missed"
    again = figures[AGAIN]
    noise = abs(again / ours - 1) if isinstance(again, float) and isinstance(ours, float) else float("nan")
    summary = (f"zswarm's build / fastest build that runs here ({best_name}): {ratio:.3f} "
               f"(aim ≥ 0.95: {verdict}); the same build measured twice differed by {noise:.1%}")
    table = "\n".join(rows)
    env = install.build_env()
    doc = (f"## llama.cpp build: zswarm's against other builds of the same source\n\n"
           f"Date: {now_utc()}. Machine: {machine(f'llama-cpp-python {install.llama_pin().split(chr(61))[-1]}')}. "
           f"Load average at the end: {loadavg()}.\n\n"
           f"Command: `{command_line()}` (builds interleaved round by round, {args.rounds} rounds of "
           f"{args.tokens} greedy tokens of the embedded model, 2 threads).\n"
           f"zswarm's build environment: `{' '.join(f'{k}={v!r}' for k, v in env.items())}`.\n\n"
           f"{table}\n\n{summary}.\n")
    publish("llama-build", f"{table}\n{summary}", doc, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
