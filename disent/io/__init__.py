"""Plain file and object I/O: local paths and s3:// URLs (`storage`), and the boto3 client, opener
and uploads behind them (`s3`). Imports nothing else from disent, so every layer may use it."""
