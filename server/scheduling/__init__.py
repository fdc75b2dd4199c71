"""The scheduling core: the streams' books (states, slots, utterances, events) and the
micro-batching loop that drives the engine's face. It knows no gRPC, protobuf or metrics library."""
