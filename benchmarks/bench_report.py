"""Reporting for `benchmarks.bench`: the run's environment, the results table, atomic JSON + Markdown files."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from benchmarks import bench_hf
from mfcore.files import PACKAGE, git_commit, write_text

PACKAGES = ("torch", "torchvision", "timm", "numpy", "scipy", "transformers")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_features() -> dict:
    """The CPU's vendor, model, the vector-instruction flags that decide which kernels oneDNN and ATen pick
    (/proc/cpuinfo, Linux), and the capability ATen dispatches to: two machines compare only when these match."""
    info: dict = {"vendor": None, "model": _cpu_name(), "flags": [],
                  "aten_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id") and info["vendor"] is None:
                info["vendor"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                info["flags"] = [f for f in VECTOR_FLAGS if f in present]
                break
    except OSError:
        pass
    return info


def cpu_family_tag() -> str:
    """"intel-xeon", "amd-epyc", ...: the name part of a committed per-CPU-family result file."""
    model = _cpu_name().lower()
    vendor = "amd" if "amd" in model else "intel" if "intel" in model else "cpu"
    for family in ("epyc", "ryzen", "xeon", "core"):
        if family in model:
            return f"{vendor}-{family}"
    return vendor


def source_digest(root: Path = PACKAGE) -> str:
    """sha256 of the package's Python sources (relative paths and contents, in path order): names the code
    that ran even where the checkout's .git is missing or stale, e.g. a copy sent to a GPU machine.
    Compare with `python -c "from benchmarks.bench_report import source_digest; print(source_digest())"`."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git() -> dict:
    """Commit of the checkout the package runs from (mfcore.training.checkpoint.git_commit), whether tracked
    files differ from it, and the digest of the sources that ran."""
    commit = git_commit()
    known = commit != "unknown"
    return {"commit": commit.removesuffix("-dirty") if known else None,
            "dirty": commit.endswith("-dirty") if known else None, "source_sha256": source_digest()}


def environment(device: torch.device, threads: int, command: list[str] | None = None) -> dict:
    """Date, machine, versions, threads and git commit: everything needed to read or redo the numbers."""
    machine = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_features": cpu_features(),
               "logical_cpus": os.cpu_count(),
               "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                          "cudnn": torch.backends.cudnn.version()}
    versions = {"python": platform.python_version(), "mfcore": _version("mfcore"),
                **{p: _version(p) for p in PACKAGES}}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "threads": threads, "interop_threads": torch.get_num_interop_threads(),
            "command": " ".join(command if command is not None else ["python", "-m", "mfcore", *sys.argv[1:]]),
            "machine": machine, "versions": versions, "git": _git(),
            "transformers_compared": bench_hf.available()}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.1f} {unit}"


def table_rows(cases: list[dict]) -> list[list[str]]:
    """One row per case: name, what, mfcore, transformers, ratio (CPU-time ratio), target, met."""
    rows = []
    for c in cases:
        mf, hf = c.get("mfcore", {}).get("value"), c.get("transformers", {}).get("value")
        ratio = "-"
        if "ratio" in c:
            others = [f"{label} {c[key]:.2f}" for key, label in (("ratio_cpu_time", "cpu"), ("ratio_min", "min"),
                                                                  ("ratio_peak", "peaks")) if key in c]
            ratio = f"{c['ratio']:.2f}" + (f" ({', '.join(others)})" if others else "")
        target = f"<= {c['target']:.2f}" if "target" in c else "-"
        if "target_img_s" in c:
            target = f">= {c['target_img_s']:.1f} img/s"
        met = ("yes" if c["met"] else "**no**") if "met" in c else "-"
        if c.get("noisy"):
            met += " (noisy)"
        extra = c.get("mfcore", {}).get("achieved_tflops")
        what = c["what"] + (f"; mfcore {extra * 1e3:.0f} GFLOP/s" if extra is not None else "")
        rows.append([c["name"], what, _fmt(mf, c["unit"]), _fmt(hf, c["unit"]), ratio, target, met])
    return rows


HEADER = ["benchmark", "what", "mfcore", "transformers", "mfcore / transformers", "target", "met"]


def print_table(cases: list[dict]) -> None:
    rows = [HEADER] + table_rows(cases)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def markdown(result: dict) -> str:
    env, m = result["environment"], result["environment"]["machine"]
    git = env["git"]
    commit = (git["commit"] or "unknown")[:12] + (" (with uncommitted changes)" if git["dirty"] else "")
    if git.get("source_sha256"):  # absent from files written before it was recorded
        commit += f"; mfcore sources sha256 {git['source_sha256'][:12]}"
    hardware = m["gpu"]["name"] if "gpu" in m else f"{m['cpu']}, {m['usable_cpus']} usable CPUs"
    if "gpu" not in m and m.get("cpu_features"):  # absent from files written before it was recorded
        feats = m["cpu_features"]
        hardware += f" ({', '.join(feats['flags']) or 'no AVX2'}; ATen dispatch {feats['aten_capability']})"
    load = " -> ".join(f"{x[0]:.1f}" for x in (m.get("load_average_start"), m.get("load_average_end")) if x)
    flags = ", quick" if result["quick"] else ""
    flags += f", mfcore torch.compile'd ({result['compiled']})" if result.get("compiled") else ""
    flags += f", only {', '.join(result['only'])}" if result.get("only") else ""
    lines = [f"# mfcore benchmarks ({env['device']}{flags})", "",
             f"- date: {env['date']}; git commit {commit}",
             f"- command: `{env['command']}`",
             f"- hardware: {hardware}; {env['threads']} threads; 1-minute load average {load}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
             f"- method: median of {result['reps']} alternating repetitions after {result['warmup']} warm-up "
             "call(s) per side (matcher: 10x as many); ratio = mfcore / transformers median wall time; in "
             "parentheses the ratios of median process CPU time and of the fastest calls (memory: of process "
             "peaks)", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result["cases"])]
    if any(c.get("noisy") for c in result["cases"]):
        lines += ["", "(noisy): a side's median call took over 1.3x its fastest one, i.e. other processes competed "
                  "for the cores during the run; the ratio then mixes compute with scheduling. Rerun on an idle "
                  "machine, or compare the single-thread CPU-time ratio."]
    if result.get("checks"):
        lines += ["", "Cross-checks:"] + [f"- {k}: {v}" for k, v in result["checks"].items()]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write <out_dir>/<stem>.json and <stem>.md atomically; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_text(json_path, json.dumps(result, indent=1) + "\n")
    write_text(md_path, markdown(result))
    return json_path, md_path
