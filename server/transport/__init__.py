"""The gRPC side: the nemostream.v1 and Riva ASR servicers on one call skeleton, and their request
checks, audio decoding, responses, security and per-client limits."""
