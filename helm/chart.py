"""``helm lint`` and ``helm template`` for the meshllm chart without a helm binary.

Runs Helm's own engine (Helm v4, through the ``helm-python-sdk`` package that ``make setup``
installs), offline: no cluster is contacted. Value files merge the way ``helm -f a -f b`` merges
them (later files win; maps merge, lists are replaced), and are checked against the chart's
``values.schema.json`` before rendering, as ``helm install`` does::

    .venv/bin/python helm/chart.py lint helm/meshllm -f helm/meshllm/ci/cpu-values.yaml
    .venv/bin/python helm/chart.py template meshllm helm/meshllm -f helm/meshllm/ci/cpu-values.yaml
    .venv/bin/python helm/chart.py install meshllm helm/meshllm -n meshllm --dry-run

``install --dry-run`` is ``helm install --dry-run=client``: Helm's install action, its kubeVersion
check and NOTES included, without a cluster. A real install needs a cluster: use ``helm install``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import helm_python as helm

KUBE_VERSION = "v1.35.0"
"""Kubernetes version lint checks the chart against (its kubeVersion range must admit it)."""
NOTES = "templates/NOTES.txt"


def load_values(files: Sequence[Path]) -> dict[str, Any]:
    """Value files merged as ``helm -f`` merges them; each parsed by Helm's own YAML reader."""
    merged: dict[str, Any] = {}
    for path in files:
        merged = _merge(merged, helm.values_from_yaml(path.read_text()))
    return merged


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def render(
    chart_dir: Path, values: dict[str, Any], *, release: str = "meshllm", namespace: str = "default"
) -> dict[str, str]:
    """Rendered templates by path (``meshllm/templates/...``), empty ones left out; raises
    ``helm_python.HelmValuesError`` when the values break the schema, ``HelmRenderError`` when a
    template fails (the chart's ``fail`` messages included)."""
    with helm.Chart.load(chart_dir) as chart:
        chart.validate_schema(values)
        rendered = chart.render(
            values, name=release, namespace=namespace, is_install=True, revision=1
        )
    return {path: text for path, text in sorted(rendered.items()) if text.strip()}


def manifests_text(rendered: dict[str, str], *, notes: bool = False) -> str:
    """One multi-document YAML stream, as ``helm template`` prints it."""
    parts = []
    for path, text in rendered.items():
        if path.endswith(NOTES):
            if notes:
                parts.append(f"# NOTES\n{text.strip()}\n")
            continue
        parts.append(f"---\n# Source: {path}\n{text.strip()}\n")
    return "".join(parts)


def lint(chart_dir: Path, values: dict[str, Any], *, kube_version: str = KUBE_VERSION) -> list[str]:
    """Every lint finding (info, warning, error) as a line; empty when the chart is clean."""
    report = helm.lint(chart_dir, values, strict=True, kube_version=kube_version)
    names = {1: "INFO", 2: "WARNING", 3: "ERROR"}
    found = [
        f"[{names.get(m['severity'], 'UNKNOWN')}] {m['path']}: {m['error']}"
        for m in report.get("messages") or []
    ]
    return found + [f"[ERROR] {e}" for e in report.get("errors") or []]


def install_dry_run(
    chart_dir: Path, values: dict[str, Any], *, release: str, namespace: str
) -> dict[str, Any]:
    """What ``helm install --dry-run=client`` reports (release status, manifest, notes)."""
    with helm.Chart.load(chart_dir) as chart:
        chart.validate_schema(values)
    with helm.Config(namespace=namespace, storage_driver="memory") as config:
        return config.install(chart_dir, release, values, namespace=namespace, dry_run="client")


def _objects(manifest: str) -> int:
    return sum(line.startswith("kind: ") for line in manifest.splitlines())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chart.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    lint_p = sub.add_parser("lint", help="helm lint --strict")
    lint_p.add_argument("chart", type=Path)
    template_p = sub.add_parser("template", help="helm template: manifests to stdout")
    template_p.add_argument("release")
    template_p.add_argument("chart", type=Path)
    template_p.add_argument("--namespace", "-n", default="default")
    template_p.add_argument("--notes", action="store_true", help="also print NOTES.txt")
    install_p = sub.add_parser("install", help="helm install --dry-run=client: status and notes")
    install_p.add_argument("release")
    install_p.add_argument("chart", type=Path)
    install_p.add_argument("--namespace", "-n", default="default")
    install_p.add_argument(
        "--dry-run",
        action="store_true",
        required=True,
        help="required: no cluster is contacted (use helm install for real)",
    )
    for sp in (lint_p, template_p, install_p):
        sp.add_argument("--values", "-f", type=Path, action="append", default=[])
    args = p.parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # here, so that a reader that left is caught below, not at exit
        return status
    except BrokenPipeError:  # `chart.py template ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a values file that cannot be read
        print(f"chart.py: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    values = load_values(args.values)
    try:
        if args.command == "lint":
            found = lint(args.chart, values)
            print("\n".join(found) if found else f"{args.chart}: linted, no findings")
            return 1 if found else 0
        if args.command == "install":
            release = install_dry_run(
                args.chart, values, release=args.release, namespace=args.namespace
            )
            print(
                f"release {release['name']} in {release['namespace']}: {release['status']} "
                f"(dry run: {_objects(release['manifest'])} objects)\n\n{release['notes']}"
            )
            return 0
        rendered = render(args.chart, values, release=args.release, namespace=args.namespace)
        sys.stdout.write(manifests_text(rendered, notes=args.notes))
    except helm.HelmError as e:
        print(f"chart.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
