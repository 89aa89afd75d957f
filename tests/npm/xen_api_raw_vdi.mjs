// Exports a VDI with the `xen-api` connector's getResource and re-imports it with putResource into
// a second VDI, then exports that one; prints ONE line of JSON with the sizes and sha256 digests.
//
// usage: node xen_api_raw_vdi.mjs URL USER PASSWORD VDI_REF TARGET_VDI_REF
import { createHash } from 'node:crypto'
import { createClient } from 'xen-api'

const [url, user, password, vdi, target] = process.argv.slice(2)
const out = {}
const xapi = createClient({ url, auth: { user, password }, allowUnauthorized: true })

const download = async ref => {
  const response = await xapi.getResource('/export_raw_vdi', { query: { format: 'raw', vdi: ref }, task: true })
  const chunks = []
  for await (const chunk of response.body) chunks.push(chunk)
  const data = Buffer.concat(chunks)
  out.exportTaskResult = await response.task
  return data
}

try {
  await xapi.connect()
  const data = await download(vdi)
  out.exported = { size: data.length, sha256: createHash('sha256').update(data).digest('hex') }
  out.importResult = await xapi.putResource(data, '/import_raw_vdi', { query: { format: 'raw', vdi: target }, task: true })
  const again = await download(target)
  out.reimported = { size: again.length, sha256: createHash('sha256').update(again).digest('hex') }
} catch (error) {
  out.error = { message: error.message, code: error.code }
} finally {
  await xapi.disconnect()
}
console.log(JSON.stringify(out))
