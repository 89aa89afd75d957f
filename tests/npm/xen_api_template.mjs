// Creates a VM from a template and reverts a snapshot with Xen Orchestra's `xen-api` connector, calling
// the API as xo-server does (vatesfr/xen-orchestra: packages/xo-server/src/xapi/mixins/vm.mjs `createVm`
// and `revertVm`, packages/xo-server/src/xapi/index.mjs `_cloneVm`, @xen-orchestra/xapi/vm.mjs `snapshot`,
// vdi.mjs / vbd.mjs / vif.mjs `create`), and prints ONE line of JSON.
//
// usage: node xen_api_template.mjs URL USER PASSWORD TRANSPORT TEMPLATE_NAME
//   TRANSPORT: 'auto' (JSON-RPC on /jsonrpc) or 'xml-rpc'
// The process must exit by itself after `disconnect()`.
import { createClient } from 'xen-api'

const [url, user, password, transport, templateName] = process.argv.slice(2)
const GiB = 1024 ** 3
const out = { transport }
const opts = { url, auth: { user, password }, allowUnauthorized: true }
if (transport !== 'auto') {
  opts.transport = transport
}
const xapi = createClient(opts)
const describeError = error => ({ name: error?.constructor?.name, code: error?.code, params: error?.params, message: error?.message })

// XO's getObject: from the connector's object cache
const findObject = predicate => Object.values(xapi.objects.all).find(predicate)

try {
  await xapi.connect()
  await xapi.objectsFetched // callAsync() waits for tasks through the event cache
  const template = findObject(o => o.$type === 'VM' && o.is_a_template && o.name_label === templateName)
  const network = findObject(o => o.$type === 'network' && o.bridge === 'xenbr0')
  const sr = xapi.pool.default_SR

  // -- createVm ------------------------------------------------------------------------------
  const tasksBefore = (await xapi.call('task.get_all')).length
  const vmRef = await xapi.callAsync('VM.clone', template.$ref, 'npm-from-template') // _cloneVm
  await xapi.call('VM.remove_from_other_config', vmRef, 'disks').catch(() => {}) // ::ignoreErrors()
  await xapi.callAsync('VM.provision', vmRef)
  const vm = await xapi.barrier(vmRef) // _getOrWaitObject: the record in the cache (barrier: event.inject)
  await xapi.call('VM.add_to_other_config', vmRef, 'xo:' + vm.uuid.slice(0, 8),
    JSON.stringify({ creation: { date: new Date().toISOString(), template: template.uuid, user: 'npm' } }))
  // _editVm: name_description, CPUs (VCPUs_max first: constraint cpusStaticMax gte), memoryMax
  await xapi.call('VM.set_name_description', vmRef, 'created by xen-api')
  if (+vm.VCPUs_max < 2) {
    await xapi.call('VM.set_VCPUs_max', vmRef, 2)
  }
  await xapi.call('VM.set_VCPUs_at_startup', vmRef, 2)
  const dynamicMax = 2 * GiB
  await xapi.call('VM.set_memory_limits', vmRef, Math.min(+vm.memory_static_min, dynamicMax),
    Math.max(dynamicMax, +vm.memory_static_max), Math.min(+vm.memory_dynamic_min, dynamicMax), dynamicMax)
  // VDI_create + VBD_create (no userdevice: the first allowed, avoiding 3)
  const createDisk = async (label, size, bootable) => {
    const vdiRef = await xapi.call('VDI.create', {
      name_description: '', name_label: label, other_config: {}, read_only: false, sharable: false,
      SR: sr, type: 'user', virtual_size: size,
    })
    const allowed = await xapi.call('VM.get_allowed_VBD_devices', vmRef)
    const userdevice = allowed[0] === '3' && allowed.length > 1 ? allowed[1] : allowed[0]
    await xapi.getField('VM', vmRef, 'power_state')
    return xapi.call('VBD.create', {
      bootable, empty: false, mode: 'RW', other_config: {}, qos_algorithm_params: {}, qos_algorithm_type: '',
      type: 'Disk', unpluggable: false, userdevice, VDI: vdiRef, VM: vmRef,
    })
  }
  const vbds = await xapi.getField('VM', vmRef, 'VBDs')
  await createDisk('npm disk', 1024 * 1024, vbds.length === 0)
  // VIF_create
  const device = (await xapi.call('VM.get_allowed_VIF_devices', vmRef))[0]
  await xapi.getField('VM', vmRef, 'power_state')
  const MTU = await xapi.getField('network', network.$ref, 'MTU')
  await xapi.call('VIF.create', {
    device, locking_mode: 'network_default', MAC: '', MTU, network: network.$ref, other_config: {},
    qos_algorithm_params: {}, qos_algorithm_type: '', VM: vmRef,
  })
  const created = await xapi.call('VM.get_record', vmRef)
  out.created = {
    ref: vmRef, is_a_template: created.is_a_template, other_config: created.other_config,
    VCPUs_max: created.VCPUs_max, memory_dynamic_max: created.memory_dynamic_max,
    VBDs: created.VBDs.length, VIFs: created.VIFs.length, name_description: created.name_description,
  }
  out.tasksLeft = (await xapi.call('task.get_all')).length - tasksBefore

  // -- snapshot, change, revert --------------------------------------------------------------
  const snapRef = await xapi.callAsync('VM.snapshot', vmRef, 'npm snapshot') // VM_snapshot
  await xapi.call('VM.set_is_a_template', snapRef, false) // XO unmarks its snapshots (LICENSE_RESTRICTION ignored)
  const before = await xapi.call('VM.get_record', vmRef)
  const diskBefore = (await Promise.all(before.VBDs.map(r => xapi.call('VBD.get_record', r)))).map(v => v.VDI)
  await xapi.call('VM.set_name_description', vmRef, 'changed after the snapshot')
  await xapi.call('VM.set_VCPUs_at_startup', vmRef, 1)
  await createDisk('added after the snapshot', 1024 * 1024, false)
  await xapi.callAsync('VM.revert', snapRef) // revertVm
  const after = await xapi.call('VM.get_record', vmRef)
  const vbdsAfter = await Promise.all(after.VBDs.map(r => xapi.call('VBD.get_record', r)))
  out.reverted = {
    name_description: after.name_description, VCPUs_at_startup: after.VCPUs_at_startup, parent: after.parent,
    power_state: after.power_state, VBDs: vbdsAfter.length,
    diskReplaced: vbdsAfter.every(v => !diskBefore.includes(v.VDI)),
    snapshot: snapRef, snapshotIsSnapshot: await xapi.getField('VM', snapRef, 'is_a_snapshot'),
  }
  // cleanup: snapshot then VM (with their disks)
  for (const ref of [snapRef, vmRef]) {
    const disks = await Promise.all((await xapi.getField('VM', ref, 'VBDs')).map(r => xapi.getField('VBD', r, 'VDI')))
    await xapi.call('VM.destroy', ref)
    await Promise.all(disks.map(d => xapi.call('VDI.destroy', d).catch(() => {})))
  }
} catch (error) {
  out.error = describeError(error)
  process.exitCode = 1
} finally {
  await xapi.disconnect()
  console.log(JSON.stringify(out))
}
