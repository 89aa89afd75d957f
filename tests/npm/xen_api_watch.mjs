// Watches a xapid with Xen Orchestra's `xen-api` connector and reports, one JSON line per stage.
//
// usage: node xen_api_watch.mjs URL USER PASSWORD TRANSPORT VM_UUID
//   1. connects and waits for objectsFetched: prints {"stage":"fetched", …} with the cached VMs;
//   2. waits until the VM VM_UUID shows power_state Running in the object cache (someone else starts
//      it): prints {"stage":"running", "at": <epoch ms>};
//   3. stops it with callAsync('VM.clean_shutdown'), which resolves through task events: prints
//      {"stage":"stopped", "tasks": […task records seen in the cache…]};
//   4. disconnects; the process exits by itself.
import { createClient } from 'xen-api'

const [url, user, password, transport, vmUuid] = process.argv.slice(2)
const say = line => console.log(JSON.stringify(line))
const opts = { url, auth: { user, password }, allowUnauthorized: true }
if (transport !== 'auto') {
  opts.transport = transport
}
const xapi = createClient(opts)
const tasks = new Map()
let announced = false
let resolveRunning
const running = new Promise(resolve => {
  resolveRunning = resolve
})

const watch = objects => {
  for (const object of Object.values(objects)) {
    if (object.$type === 'task') {
      tasks.set(object.$ref, { name_label: object.name_label, status: object.status, result: object.result })
    }
    if (object.$type === 'VM' && object.uuid === vmUuid && object.power_state === 'Running' && !announced) {
      announced = true
      say({ stage: 'running', at: Date.now() })
      resolveRunning(object)
    }
  }
}

try {
  await xapi.connect()
  await xapi.objectsFetched
  const all = Object.values(xapi.objects.all)
  say({
    stage: 'fetched',
    status: xapi.status,
    vms: all.filter(o => o.$type === 'VM').map(o => ({ uuid: o.uuid, power_state: o.power_state })),
    types: [...new Set(all.map(o => o.$type))].sort(),
  })
  xapi.objects.on('add', watch)
  xapi.objects.on('update', watch)
  const vm = await running
  await xapi.callAsync('VM.clean_shutdown', vm.$ref)
  say({ stage: 'stopped', tasks: [...tasks.values()] })
} catch (error) {
  say({ stage: 'error', code: error?.code, message: String(error?.message ?? error) })
} finally {
  await xapi.disconnect()
}
