"""Writes a copy of the demo GGUF whose vocabulary has fill-in-the-middle tokens.

SmolLM2 was trained without FIM, but its vocabulary keeps StarCoder's
special tokens for GitHub issues, unused by chat. The copy spells three of
them as StarCoder's FIM markers (same ids, same weights, same
quantization), and renames the repository-level tokens away so that
llama.cpp's /infill puts no repository context before the prompt: the
prompt it builds is then exactly the one a `suffix` asks for, and the tests
can hold ours to it. What the model writes into the gap means nothing; that
both engines build and continue the same prompt does.

Run with a Python that has the `gguf` package (`cargo xtask provision fim`).
Usage: python fim_variant.py SOURCE_GGUF OUT_GGUF
"""

import sys

import gguf

RENAMES = {
    "<issue_start>": "<fim_prefix>",
    "<issue_comment>": "<fim_suffix>",
    "<issue_closed>": "<fim_middle>",
    "<repo_name>": "<unused_repo_name>",
    "<reponame>": "<unused_reponame>",
    "<file_sep>": "<unused_file_sep>",
    "<filename>": "<unused_filename>",
}


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(source, "r")
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, architecture, endianess=reader.endianess)
    for field in reader.fields.values():
        # The architecture and the header's own fields are the writer's.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.Tokenizer.LIST:
            missing = sorted(set(RENAMES) - set(value))
            if missing:
                sys.exit(f"{source}: its vocabulary has no {missing}; is it SmolLM2?")
            value = [RENAMES.get(token, token) for token in value]
        kind = field.types[0]
        item_kind = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=item_kind)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


if __name__ == "__main__":
    main()
