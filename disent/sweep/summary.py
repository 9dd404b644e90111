"""A sweep in MLflow: the parent run (the sweep's config and points), and at the end its summary: a
CSV of every child's point and results, and a PNG of class-from-s against class-from-mu (leakage),
one labelled point per child, so the trade-off the sweep explores shows at a glance."""
from __future__ import annotations

import csv
import logging
import os
import tempfile
import textwrap
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from disent.sweep.points import Sweep, split_values
from disent.tracking.run import MLflowRun, SystemMetrics, make_client, register_run_model

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
REGISTER_PARAM = "sweep.register_best"  # the registered model name the best child's model goes to
AXIS_PARAM = "sweep.axis."  # on the parent: sweep.axis.<key> = "v1,v2"; a child's value is its param <key>
# (column, MLflow metric): the headline results of a child
RESULTS = (("class_from_s", "eval/class_from_s_mlp"), ("class_from_mu", "eval/class_from_z_mean_mlp"),
           ("class_from_z", "eval/class_from_z_sample_mlp"), ("chance", "eval/chance"), ("z_gain", "eval/z_gain"),
           ("vae_loss", "vae_loss"))


def start_parent(uri: str, experiment: str, sweep: Sweep, name: str, register_best: str | None = None) -> str:
    """The parent run, with the sweep's axes and points as params and sweep.json as an artifact; with
    register_best, the summary registers the best child's model under that name."""
    run = MLflowRun(uri, experiment, SystemMetrics(uri, False))
    run_id = run.open(None, name)
    client = run.client
    client.set_tag(run_id, "disent.kind", "sweep")
    client.log_param(run_id, "sweep.config", sweep.config)
    client.log_param(run_id, "sweep.mode", sweep.mode)
    client.log_param(run_id, "sweep.points", len(sweep.points()))
    if register_best:
        client.log_param(run_id, REGISTER_PARAM, register_best)
    for key, values in sweep.axes.items():
        client.log_param(run_id, f"{AXIS_PARAM}{key}", ",".join(values))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.json"
        path.write_text(sweep.to_json())
        client.log_artifact(run_id, str(path))
    return run_id


def children(client, parent_id: str) -> list:
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=10_000)


def summarize(uri: str, parent_id: str, out_dir: Path | None = None, finish: bool = True) -> dict:
    """Write summary.csv and leakage.png to the parent run (and out_dir), and finish the parent:
    FINISHED when every child finished, FAILED otherwise. Returns the rows."""
    client = make_client(uri)
    params = client.get_run(parent_id).data.params
    axes = {k[len(AXIS_PARAM):]: v for k, v in params.items() if k.startswith(AXIS_PARAM)}
    keys = [k for k, values in axes.items() if len(set(split_values(values))) > 1]  # shared settings: parent params
    rows = []
    for child in sorted(children(client, parent_id), key=_point_order):
        row = {"label": child.info.run_name, "run_id": child.info.run_id, "status": child.info.status}
        row.update({key: child.data.params.get(key) for key in sorted(keys)})
        row.update({column: child.data.metrics.get(metric) for column, metric in RESULTS})
        row["score"] = _score(row)
        rows.append(row)
    best = _register_best(client, rows, params.get(REGISTER_PARAM), parent_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = folder / "summary.csv", folder / "leakage.png"
        _write_csv(rows, csv_path)
        _plot(rows, png_path, client.get_run(parent_id).info.run_name)
        client.log_artifact(parent_id, str(csv_path), "summary")
        client.log_artifact(parent_id, str(png_path), "summary")
    if finish:
        ok = rows and all(r["status"] == "FINISHED" for r in rows)
        client.set_terminated(parent_id, "FINISHED" if ok else "FAILED")
    return {"rows": rows, "csv": str(csv_path), "png": str(png_path), "best": best}


def _point_order(child) -> tuple:
    """The sweep's own point order (its run_dir ends in point-NNN), then the name."""
    return child.data.params.get("run_dir", "").rsplit("point-", 1)[-1], child.info.run_name or ""


def _score(row: dict) -> float | None:
    """What "best" means: class from s minus class from mu (the class in s, and none of it in mu)."""
    if row["status"] != "FINISHED" or row["class_from_s"] is None or row["class_from_mu"] is None:
        return None
    return row["class_from_s"] - row["class_from_mu"]


def _register_best(client, rows: list[dict], name: str | None, parent_id: str) -> dict | None:
    """The best finished child (by _score) with a logged model, tagged on the parent; registered as
    `name` when given (models:/NAME/latest is then that child's model)."""
    scored = [r for r in rows if r["score"] is not None
              and any(a.path == "model" for a in client.list_artifacts(r["run_id"]))]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["score"])
    client.set_tag(parent_id, "disent.sweep.best_run", best["run_id"])
    client.set_tag(parent_id, "disent.sweep.best_label", best["label"])
    out = {"run_id": best["run_id"], "label": best["label"], "score": best["score"]}
    if name:
        out.update(name=name, version=register_run_model(client, name, best["run_id"]))
    return out


def finish_if_complete(uri: str, parent_id: str, run_dir: str | Path, point: int, size: int) -> bool:
    """A point has ended for good (finished, or failed and not requeued): mark it in run_dir/ended/, and
    when every point is marked, summarise the sweep, once (the first task to claim run_dir/summarised
    does it). True when this call summarised. A preempted point is requeued and not marked, so the
    sweep waits for it; a point cancelled for good never marks itself: `disent sweep --summarize`."""
    ended = Path(run_dir) / "ended"
    ended.mkdir(parents=True, exist_ok=True)
    (ended / str(point)).touch()
    if len(list(ended.iterdir())) < size:
        return False
    try:
        os.close(os.open(Path(run_dir) / "summarised", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    summarize(uri, parent_id, Path(run_dir) / "summary")
    return True


def _write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    done = [r for r in rows if r["class_from_s"] is not None and r["class_from_mu"] is not None]
    # A Figure of its own, not pyplot's: no display backend, and nothing global to close or leave set.
    fig = Figure(figsize=(7.5, 5.5 + 0.22 * len(done)), dpi=120)
    ax = fig.subplots()
    markers = "osD^v<>PX*"
    for i, r in enumerate(done):  # one colour and marker per point, named in the legend: labels never overlap
        ax.scatter(r["class_from_mu"], r["class_from_s"], s=55, marker=markers[i % len(markers)],
                   color=colormaps["tab10"](i % 10), label=f"{i + 1}: {r['label']}", zorder=3)
        ax.annotate(str(i + 1), (r["class_from_mu"], r["class_from_s"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=7)
    chance = next((r["chance"] for r in done if r["chance"] is not None), None)
    if chance is not None:
        ax.axvline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    if done:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=7, ncol=1, frameon=False)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("class from mu (leakage into the unspecified code; lower is better)")
    ax.set_ylabel("class from s (higher is better)")
    missing = len(rows) - len(done)
    title += f" ({missing} point(s) without results)" if missing else ""
    ax.set_title(textwrap.fill(title, 100), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
