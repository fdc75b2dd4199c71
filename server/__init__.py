"""The ASR service. Its sub-packages name the architecture, in the one import direction that
pyproject.toml's import-linter contracts check (each may import only those after it):

- service: the process entry (asr-server's flags) and its assembly: the in-process gRPC server,
  the frontend processes, the automatic sizing.
- runtime: the processes below the service and the typed wire between them: the engine host and
  a frontend's scheduler stand-in, several engine cores, the engine worker process.
- transport: the gRPC side: the nemostream.v1 and Riva servicers on one call skeleton, request
  checks, audio decoding, responses, security and per-client limits.
- ops: what operators watch: metrics, the ops HTTP port, the lifecycle every process reports.
- scheduling: the scheduling core: streams' books and micro-batching over the engine's face.
"""
