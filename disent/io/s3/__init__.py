"""S3 access for shards, manifests and checkpoints, and the ``s3://`` scheme for WebDataset.

Its parts: connection.py (URLs, the client and its retries, the errors), streams.py (reading and writing
one object as a stream, the gopen scheme), objects.py (whole-object operations).

Importing this module registers :func:`gopen_s3` in ``webdataset.gopen.gopen_schemes`` so that
``wds`` pipelines (and :func:`webdataset.gopen`) open ``s3://bucket/key`` URLs.

Clients come from boto3's standard credential chain (environment, ``AWS_PROFILE``, shared
config files, instance/container roles). ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
selects an S3-compatible server (path-style addressing is then used). Every call is retried by
botocore's "standard" retry mode (throttling, 5xx responses and connection errors, capped
exponential backoff with jitter); each retry is logged as a warning naming the object. Reads
that fail part-way resume with a ranged GET from the byte already received.

Credentials are never logged or put into error messages: messages name the URL and, for
custom servers, the endpoint only.

Tuning through the environment: ``DISENT_S3_RETRIES`` (attempts after the first, default 10;
botocore's ``max_attempts``, which also bounds the resumes of one broken read; botocore's jittered
delays of up to 0.05 s x 2^n, capped at 20 s, make 10 retries ride out an outage of roughly
15-30 s before the rank fails with a retryable error; botocore's standard mode also keeps a retry
budget per client, which a long outage can spend, after which calls fail at once, still as
S3Unavailable, exit 69, for the launcher to restart),
``DISENT_S3_BACKOFF`` (first delay in seconds before resuming a broken read, default 0.5; doubled
each time, capped at 20 s). botocore's own backoff cannot be configured, so this knob applies to
the ranged resume only.
"""
from disent.io.s3.connection import (MISSING_CODES, THROTTLE_CODES, TRANSIENT_CODES, S3Error, S3NotFound, S3Unavailable,
                                 client, endpoint_url, is_retryable, is_s3_url, join_url, parse_s3_url)
from disent.io.s3.objects import (ObjectInfo, create_bucket, delete, download, exists, list_prefix, read_bytes,
                                  upload_bytes, upload_file, upload_fileobj)
from disent.io.s3.streams import S3Reader, S3Writer, gopen_s3, open_read, register_gopen

register_gopen()

__all__ = ["MISSING_CODES", "THROTTLE_CODES", "TRANSIENT_CODES", "ObjectInfo", "S3Error", "S3NotFound", "S3Reader",
           "S3Unavailable", "S3Writer", "client", "create_bucket", "delete", "download", "endpoint_url", "exists",
           "gopen_s3", "is_retryable", "is_s3_url", "join_url", "list_prefix", "open_read", "parse_s3_url",
           "read_bytes", "register_gopen", "upload_bytes", "upload_file", "upload_fileobj"]
