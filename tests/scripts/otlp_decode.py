"""Decodes OTLP profiles export requests with PyPI's opentelemetry-proto, a reader written
by others, and prints what the tests check as JSON.

usage: python3 otlp_decode.py FILE...   (each FILE one ExportProfilesServiceRequest, gzipped or not)

Checks the dictionary's zero values (every table's index 0) and that every index is in range,
exiting 1 with a message on the first violation. Prints one JSON object per file:
{"profiles": [{"resource": {key: value}, "sample_type": [type, unit], "period_type": [...],
  "period": n, "time_unix_nano": n, "duration_nano": n,
  "samples": [{"functions": [leaf, ..., root], "count": n, "attributes": {k: v}}],
  "mappings": [{"filename": s, "build_id": s}]}]}
"""

import gzip
import json
import sys

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2
from opentelemetry.proto.profiles.v1development import profiles_pb2


def fail(message):
    print(f"invalid OTLP request: {message}", file=sys.stderr)
    sys.exit(1)


def any_value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def check_zero(d):
    if not d.string_table or d.string_table[0] != "":
        fail("string_table[0] must be the empty string")
    zero = {
        "mapping_table": profiles_pb2.Mapping(),
        "location_table": profiles_pb2.Location(),
        "function_table": profiles_pb2.Function(),
        "link_table": profiles_pb2.Link(),
        "attribute_table": profiles_pb2.KeyValueAndUnit(),
        "stack_table": profiles_pb2.Stack(),
    }
    for name, empty in zero.items():
        table = getattr(d, name)
        if not table or table[0] != empty:
            fail(f"{name}[0] must be the zero value")


def decode(raw):
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    request = profiles_service_pb2.ExportProfilesServiceRequest()
    request.ParseFromString(raw)
    d = request.dictionary
    check_zero(d)

    def s(i):
        if not 0 <= i < len(d.string_table):
            fail(f"string index {i} out of range")
        return d.string_table[i]

    def at(table, i, what):
        if not 0 <= i < len(table):
            fail(f"{what} index {i} out of range")
        return table[i]

    def attributes(indices):
        out = {}
        for i in indices:
            kv = at(d.attribute_table, i, "attribute")
            out[s(kv.key_strindex)] = any_value(kv.value)
        return out

    profiles = []
    for rp in request.resource_profiles:
        resource = {kv.key: any_value(kv.value) for kv in rp.resource.attributes}
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                samples = []
                for sample in p.samples:
                    stack = at(d.stack_table, sample.stack_index, "stack")
                    functions = []
                    for li in stack.location_indices:
                        location = at(d.location_table, li, "location")
                        at(d.mapping_table, location.mapping_index, "mapping")
                        for line in location.lines:
                            f = at(d.function_table, line.function_index, "function")
                            functions.append(s(f.name_strindex))
                    if len(sample.values) != 1:
                        fail(f"a sample has {len(sample.values)} values for one sample type")
                    samples.append({
                        "functions": functions,
                        "count": sample.values[0],
                        "attributes": attributes(sample.attribute_indices),
                    })
                mappings = []
                seen = set()
                for sample in p.samples:
                    for li in d.stack_table[sample.stack_index].location_indices:
                        mi = d.location_table[li].mapping_index
                        if mi and mi not in seen:
                            seen.add(mi)
                            m = d.mapping_table[mi]
                            attrs = attributes(m.attribute_indices)
                            mappings.append({
                                "filename": s(m.filename_strindex),
                                "build_id": attrs.get("process.executable.build_id.gnu", ""),
                            })
                profiles.append({
                    "resource": resource,
                    "sample_type": [s(p.sample_type.type_strindex), s(p.sample_type.unit_strindex)],
                    "period_type": [s(p.period_type.type_strindex), s(p.period_type.unit_strindex)],
                    "period": p.period,
                    "time_unix_nano": p.time_unix_nano,
                    "duration_nano": p.duration_nano,
                    "samples": samples,
                    "mappings": mappings,
                })
    return {"profiles": profiles}


def main():
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            print(json.dumps(decode(f.read())))


if __name__ == "__main__":
    main()
