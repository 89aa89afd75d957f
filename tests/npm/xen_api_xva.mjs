// Exports a VM as an XVA with the `xen-api` connector's getResource (GET /export, through a task)
// and imports it back with putResource (PUT /import into an SR, through a task); prints ONE line
// of JSON with the export's size and sha256, both task results and the imported VM's ref.
//
// usage: node xen_api_xva.mjs URL USER PASSWORD VM_REF SR_REF COMPRESSION
import { createHash } from 'node:crypto'
import { createClient } from 'xen-api'

const [url, user, password, vm, sr, compression] = process.argv.slice(2)
const out = {}
const xapi = createClient({ url, auth: { user, password }, allowUnauthorized: true })

try {
  await xapi.connect()
  const query = { ref: vm }
  if (compression) query.use_compression = compression
  const response = await xapi.getResource('/export', { query, task: true })
  const chunks = []
  for await (const chunk of response.body) chunks.push(chunk)
  const data = Buffer.concat(chunks)
  out.exportTaskResult = await response.task
  out.exported = { size: data.length, sha256: createHash('sha256').update(data).digest('hex'),
                   head: data.subarray(0, 4).toString('hex') }
  out.importResult = await xapi.putResource(data, '/import', { query: { sr_id: sr }, task: true })
  const match = /OpaqueRef:[0-9a-zA-Z-]+/.exec(String(out.importResult))
  out.imported = match === null ? null : match[0]
  if (out.imported !== null) out.importedName = await xapi.call('VM.get_name_label', out.imported)
} catch (error) {
  out.error = { message: error.message, code: error.code }
} finally {
  await xapi.disconnect()
}
console.log(JSON.stringify(out))
