"""The wire shape of generated protobuf modules: name -> fields (number, type, label, type
name), enum values, service methods. Both sides of the Riva wire-format test use it: ours in
the test process, Riva's own in tests/riva_client_driver.py (run as a script in the Riva
client's environment, where this file is importable from the script's folder); it needs only
google.protobuf."""

from __future__ import annotations


def describe(modules) -> dict:
    from google.protobuf import descriptor_pb2

    out: dict = {}
    for module in modules:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)

        def walk(message, prefix):
            name = f"{prefix}.{message.name}"
            out[name] = {f.name: [f.number, f.type, f.label, f.type_name] for f in message.field}
            for nested in message.nested_type:
                walk(nested, name)

        for message in proto.message_type:
            walk(message, proto.package)
        for enum in proto.enum_type:
            out[f"{proto.package}.{enum.name}"] = {v.name: v.number for v in enum.value}
        for service in proto.service:
            out[f"{proto.package}.{service.name}"] = {
                m.name: [m.input_type, m.output_type, m.client_streaming, m.server_streaming] for m in service.method}
    return out
