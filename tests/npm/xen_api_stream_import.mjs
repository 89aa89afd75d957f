// Uploads of unknown length through the `xen-api` connector's putResource, as Xen Orchestra streams
// restores: the body is a Node Readable without a length, so the connector announces
// `Content-Length: 1125899906842624` (1 PiB), probes with an empty body first, then streams, and
// hangs up once its stream ended without reading a reply (xapi's 200 came before the body).
// It exports the VM (getResource /export) and the VDI (getResource /export_raw_vdi), then imports
// both from Readables cut in odd pieces; prints ONE line of JSON with both task results.
//
// usage: node xen_api_stream_import.mjs URL USER PASSWORD VM_REF SR_REF VDI_REF TARGET_VDI_REF
import { Readable } from 'node:stream'
import { createClient } from 'xen-api'

const [url, user, password, vm, sr, vdi, target] = process.argv.slice(2)
const out = {}
const xapi = createClient({ url, auth: { user, password }, allowUnauthorized: true })

async function download (path, query) {
  const response = await xapi.getResource(path, { query, task: true })
  const chunks = []
  for await (const chunk of response.body) chunks.push(chunk)
  await response.task
  return Buffer.concat(chunks)
}

// a stream of *data* in pieces of 100 000 bytes, with no length
function unsized (data) {
  function * pieces () {
    for (let at = 0; at < data.length; at += 100000) yield data.subarray(at, at + 100000)
  }
  const stream = Readable.from(pieces())
  if (stream.length !== undefined) throw new Error('the stream must have no length')
  return stream
}

try {
  await xapi.connect()
  const xvaData = await download('/export', { ref: vm })
  out.xvaSize = xvaData.length
  out.xvaResult = String(await xapi.putResource(unsized(xvaData), '/import', { query: { sr_id: sr }, task: true }))
  const match = /OpaqueRef:[0-9a-zA-Z-]+/.exec(out.xvaResult)
  out.imported = match === null ? null : match[0]
  const raw = await download('/export_raw_vdi', { vdi, format: 'raw' })
  out.rawSize = raw.length
  out.rawResult = String(await xapi.putResource(unsized(raw), '/import_raw_vdi',
    { query: { vdi: target, format: 'raw' }, task: true }))
} catch (error) {
  out.error = { message: error.message, code: error.code, stack: error.stack }
} finally {
  await xapi.disconnect()
}
console.log(JSON.stringify(out))
