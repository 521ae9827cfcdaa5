"""`longdoc run FILE` and `longdoc batch DIR`: documents processed from the command line.

One concept per module:
- request: which tasks with which params (validated by pipeline.tasks), and the per-file result key
- walk: the folder walk (include/exclude), sha256 + media-type sniff of every file
- passwords: --password-file, the candidate passwords of a file
- records: the record of one file (what every output is made from)
- local: one file in this process (contained parse, chunking, the engine's tasks) -> a record
- journal: the append-only results file (atomic lines, torn tail dropped, latest record per path)
- embedded / remote: the two batch back ends (in-process engine; a running longdoc service)
- api_client: HTTP calls to a longdoc service with backoff on 429/503 (Retry-After honoured)
- runner: plan (skip done keys, process identical files once), dispatch, record, stop cleanly
- stop: Ctrl-C / SIGTERM handling (first: finish in flight, second: abandon)
- display: live progress (rich on a terminal, log lines otherwise) and the summary table
- render: readable text, the Markdown report and the CSV rows of records
"""
