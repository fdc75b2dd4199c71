"""The process entry (asr-server) and the assembly of a server: the gRPC server of one process,
the frontend processes in front of one engine process, the automatic sizing of both."""
