"""MLflow tracking for multi-rank training: rank 0 logs the run; other nodes add only their system metrics.

`MLflowLogger.start()` creates the run (or resumes the one a checkpoint names) on rank 0 and
broadcasts the run id to every rank. Params, tags, metrics and artifacts are queued and sent by a
background thread, so logging never blocks a training step. If the tracking server cannot be
reached, the logger warns once, keeps what is queued and retries with backoff; when the queue
overflows, the oldest metrics are dropped and counted. Nothing whose key looks like a secret is
ever sent. MLflow's system-metrics monitor runs on the first rank of every node, each node's metrics
under system/node_<i>/ when there are several.

The parts, each owning its state:

* `secret_filter` -- what may be sent (`looks_secret`, `safe_params`, `safe_tags`);
* `sendqueue`     -- `SendQueue`: the bounded queue, its drop policy and dropped count, batching;
* `sender`        -- `Sender`: the background thread, backoff, permanent errors, warn-once;
* `run`           -- `MLflowRun`: the client, creating/resuming the run, sending each kind of op;
                     `SystemMetrics`, `node_id`; `tracking_uri`;
* `provenance`    -- `git_commit`;
* `logger`        -- `MLflowLogger`, the facade.

Why not MLflow's own async logging or HTTP retries (read in mlflow 3.x): `log_batch(synchronous=False)`
feeds an unbounded queue that logs an error and discards each batch whose send fails (no retry, no
dropped count; run creation, artifacts and status stay synchronous), and MLFLOW_HTTP_REQUEST_MAX_RETRIES
retries one HTTP request for minutes while blocking its caller (nothing for a sqlite store); so the
bounded queue, the retry-until-close and the dropped-count report are ours.
"""
from disent.tracking.logger import MAX_BATCH_PARAMS, MLflowLogger
from disent.tracking.provenance import git_commit
from disent.tracking.run import DEFAULT_URI, MLflowRun, SystemMetrics, tracking_uri
from disent.tracking.secret_filter import MAX_PARAM_VALUE, SECRET_KEY, looks_secret, safe_params, safe_tags
from disent.tracking.sender import CLOSING_RETRY_S, PERMANENT_ERRORS, Sender
from disent.tracking.sendqueue import MAX_BATCH_METRICS, Op, SendQueue

__all__ = [
    "CLOSING_RETRY_S", "DEFAULT_URI", "MAX_BATCH_METRICS", "MAX_BATCH_PARAMS", "MAX_PARAM_VALUE", "PERMANENT_ERRORS",
    "SECRET_KEY", "MLflowLogger", "MLflowRun", "Op", "SendQueue", "Sender", "SystemMetrics", "git_commit",
    "looks_secret", "safe_params", "safe_tags", "tracking_uri",
]
