// Connects Xen Orchestra's `xen-api` connector to a xapid and prints ONE line of JSON.
//
// usage: node xen_api_check.mjs URL USER PASSWORD TRANSPORT [VM_RECORD_JSON]
//   TRANSPORT: 'auto' (connector default, JSON-RPC on /jsonrpc), 'json-rpc' or 'xml-rpc'
//   VM_RECORD_JSON: optional VM.create record; created (memory sizes sent as JS numbers,
//                   as XO does), read back, then destroyed.
//
// Run from a directory whose node_modules holds xen-api (the test copies this file there).
// The process must exit by itself after `disconnect()`: it never calls process.exit().
import { createClient } from 'xen-api'

const [url, user, password, transport = 'auto', vmRecordJson] = process.argv.slice(2)

const out = { transport }

const describeError = error =>
  error == null
    ? { name: String(error) }
    : {
        name: error.constructor?.name ?? typeof error,
        code: error.code,
        params: error.params,
        message: error.message,
      }

// resolves to true if `promise` settles within `ms`, false otherwise; leaves no timer behind
const settlesWithin = (promise, ms) => {
  let timer
  return Promise.race([
    promise.then(
      () => true,
      () => true
    ),
    new Promise(resolve => {
      timer = setTimeout(resolve, ms, false)
    }),
  ]).finally(() => clearTimeout(timer))
}

const opts = { url, auth: { user, password }, allowUnauthorized: true }
if (transport !== 'auto') {
  opts.transport = transport
}
const xapi = createClient(opts)
xapi.on('eventFetchingError', error => {
  out.eventFetchingError = describeError(error)
})

try {
  await xapi.connect()
  out.status = xapi.status
  out.sessionIdIsString = typeof xapi.sessionId === 'string' && xapi.sessionId.startsWith('OpaqueRef:')

  // set by connect() itself from pool.get_all_records (no event watching needed)
  const pool = xapi.pool
  out.pool = {
    ref: pool.$ref,
    id: pool.$id,
    type: pool.$type,
    uuid: pool.uuid,
    master: pool.master,
    name_label: pool.name_label,
    other_config: pool.other_config,
  }

  const vms = await xapi.call('VM.get_all_records')
  out.vms = Object.entries(vms).map(([ref, vm]) => ({
    ref,
    uuid: vm.uuid,
    name_label: vm.name_label,
    is_control_domain: vm.is_control_domain,
    power_state: vm.power_state,
    resident_on: vm.resident_on,
    memory_static_max: vm.memory_static_max,
    VCPUs_max: vm.VCPUs_max,
    other_config: vm.other_config,
  }))

  const host = await xapi.call('host.get_record', pool.master)
  out.host = {
    uuid: host.uuid,
    name_label: host.name_label,
    address: host.address,
    API_version_major: host.API_version_major,
    API_version_minor: host.API_version_minor,
    enabled: host.enabled,
    software_version: host.software_version,
    cpu_info: host.cpu_info,
    control_domain: host.control_domain,
    resident_VMs: host.resident_VMs,
    host_CPUs: host.host_CPUs,
    metrics: host.metrics,
  }

  // the connector's typed helper (wraps the record in a class named after the type)
  const wrapped = await xapi.getRecord('host', pool.master)
  out.wrappedHost = { ref: wrapped.$ref, id: wrapped.$id, type: wrapped.$type }

  try {
    out.failure = { resolved: await xapi.call('VM.get_record', 'OpaqueRef:nope') }
  } catch (error) {
    out.failure = describeError(error)
  }

  if (vmRecordJson !== undefined) {
    const record = JSON.parse(vmRecordJson)
    for (const key of Object.keys(record)) {
      if (key.startsWith('memory_')) {
        record[key] = Number(record[key])
      }
    }
    const ref = await xapi.call('VM.create', record)
    const created = await xapi.call('VM.get_record', ref)
    out.created = {
      ref,
      name_label: created.name_label,
      power_state: created.power_state,
      memory_static_max: created.memory_static_max,
      is_a_template: created.is_a_template,
    }
    await xapi.call('VM.destroy', ref)
    try {
      await xapi.call('VM.get_record', ref)
      out.created.destroyed = false
    } catch (error) {
      out.created.destroyed = error.code === 'HANDLE_INVALID'
    }
  }

  // informational only: the cache fill depends on event support (event.inject, or the
  // legacy fallback), which this check must not depend on
  out.objectsFetched = await settlesWithin(xapi.objectsFetched, 3000)
  const counts = {}
  for (const object of Object.values(xapi.objects.all)) {
    counts[object.$type] = (counts[object.$type] ?? 0) + 1
  }
  out.cachedCounts = counts
} catch (error) {
  out.error = describeError(error)
  process.exitCode = 1
} finally {
  await xapi.disconnect()
  out.statusAfterDisconnect = xapi.status
  console.log(JSON.stringify(out))
}
