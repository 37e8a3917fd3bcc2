// Reading the API's binary form of per-layer statistics (Accept: application/x-safetensors): a safetensors file,
// i.e. an 8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}, __metadata__}),
// then the tensors' little-endian bytes. The server pads the header to 8 bytes, so every tensor is viewed in place
// (no copy). Metadata values are JSON text (service/api/layer_forms.py).

export const SAFETENSORS = "application/x-safetensors";

const ARRAYS = { F32: Float32Array, I64: BigInt64Array };

/** `{tensors: {name: {shape, data}}, metadata: {key: parsed JSON}}` of a safetensors ArrayBuffer. */
export function readSafetensors(buffer) {
  const view = new DataView(buffer);
  const size = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, size)));
  const start = 8 + size;
  const tensors = {};
  const metadata = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") {
      for (const [key, text] of Object.entries(info)) metadata[key] = JSON.parse(text);
      continue;
    }
    const Kind = ARRAYS[info.dtype];
    if (!Kind) throw new Error(`tensor ${name}: unsupported dtype ${info.dtype}`);
    const [begin, end] = info.data_offsets;
    tensors[name] = { shape: info.shape, data: new Kind(buffer, start + begin, (end - begin) / Kind.BYTES_PER_ELEMENT) };
  }
  return { tensors, metadata };
}

/** Row `index` of a (rows x width) tensor as a plain array, NaN (not recorded) as null; null if all are. */
export function rowOf(tensor, index) {
  const width = tensor.shape[1];
  const row = Array.from(tensor.data.subarray(index * width, (index + 1) * width), (v) => (Number.isNaN(v) ? null : v));
  return row.length && row.every((v) => v === null) ? null : row;
}
