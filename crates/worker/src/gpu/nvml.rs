//! Real GPUs through NVML (`nvml-wrapper`): utilization, memory, temperature, power, volatile
//! uncorrected ECC errors, hardware slowdown throttling, critical XID events, and whether each
//! device still answers.

use std::sync::{Mutex, OnceLock};

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::event::EventData;
use nvml_wrapper::{Device, EventSet, Nvml};

use super::{GpuBackend, GpuError, GpuFault, GpuReading};

const MIB: u64 = 1024 * 1024;

/// Throttle reasons that mean the hardware itself is slowing the GPU down.
const HW_SLOWDOWN: ThrottleReasons = ThrottleReasons::HW_SLOWDOWN
    .union(ThrottleReasons::HW_THERMAL_SLOWDOWN)
    .union(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN);

/// XIDs caused by the application rather than the GPU (illegal access, page fault, killed
/// context…): they do not make a GPU unhealthy, or one buggy job requeued from GPU to GPU would
/// take them all down. The same list as NVIDIA's Kubernetes device plugin.
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Most XID events drained per `sample`, so a storm cannot stall the sampler.
const MAX_EVENTS_PER_SAMPLE: usize = 256;

/// One NVML handle per process, never shut down: devices and event sets borrow it for the
/// worker's whole life.
static NVML: OnceLock<Nvml> = OnceLock::new();

fn nvml() -> Result<&'static Nvml, NvmlError> {
    if let Some(nvml) = NVML.get() {
        return Ok(nvml);
    }
    let nvml = Nvml::init()?;
    // If another thread won the race, its handle is used and this one shuts down.
    Ok(NVML.get_or_init(|| nvml))
}

/// The GPUs NVML reports on this machine.
pub struct NvmlBackend {
    gpus: Vec<NvmlGpu>,
    state: Mutex<State>,
}

struct NvmlGpu {
    index: u32,
    /// `None` when NVML could not open the device at start: it reads as not responding.
    device: Option<Device<'static>>,
    uuid: String,
    name: String,
}

struct State {
    /// Critical XID events of the devices that support them (`None`: none do).
    xid_events: Option<EventSet<'static>>,
    /// Critical XIDs per GPU since the worker started.
    xids: Vec<u64>,
    /// Whether each GPU answered at the last sample, to log only changes.
    answering: Vec<bool>,
}

impl NvmlBackend {
    /// Initialises NVML and opens every device: an error without a driver or without a GPU.
    pub fn init() -> Result<Self, GpuError> {
        let nvml = nvml().map_err(|e| GpuError::Nvml(format!("cannot initialise: {e}")))?;
        let count = nvml
            .device_count()
            .map_err(|e| GpuError::Nvml(format!("cannot count devices: {e}")))?;
        if count == 0 {
            return Err(GpuError::Nvml("no GPU found".into()));
        }
        let gpus: Vec<NvmlGpu> = (0..count).map(|index| open(nvml, index)).collect();
        let xid_events = watch_xids(nvml, &gpus);
        Ok(Self {
            state: Mutex::new(State {
                xid_events,
                xids: vec![0; gpus.len()],
                answering: vec![true; gpus.len()],
            }),
            gpus,
        })
    }

    /// Counts the critical XID events that arrived since the last call.
    fn poll_xids(&self, state: &mut State) {
        let State {
            xid_events, xids, ..
        } = state;
        let Some(set) = xid_events else {
            return;
        };
        for _ in 0..MAX_EVENTS_PER_SAMPLE {
            match set.wait(0) {
                Ok(event) => self.record_xid(&event, xids),
                Err(NvmlError::Timeout) => return,
                Err(e) => {
                    tracing::debug!(error.message = %e, "cannot read XID events");
                    return;
                }
            }
        }
    }

    fn record_xid(&self, event: &EventData<'_>, xids: &mut [u64]) {
        if !event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
            return;
        }
        let xid = match event.event_data {
            Some(XidError::Value(xid)) => Some(xid),
            _ => None,
        };
        let gpu = event
            .device
            .uuid()
            .ok()
            .and_then(|uuid| self.gpus.iter().position(|g| g.uuid == uuid));
        if !is_critical(xid) {
            tracing::info!(gpu = ?gpu, xid = ?xid, "XID error caused by an application");
            return;
        }
        match gpu {
            Some(i) => {
                tracing::warn!(gpu = i, xid = ?xid, "critical XID error");
                xids[i] += 1;
            }
            None => {
                // Like NVIDIA's device plugin: a critical error we cannot place taints every GPU.
                tracing::warn!(xid = ?xid, "critical XID error on an unidentified GPU");
                xids.iter_mut().for_each(|n| *n += 1);
            }
        }
    }
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn count(&self) -> u32 {
        self.gpus.len() as u32
    }

    fn sample(&self) -> Vec<GpuReading> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.poll_xids(&mut state);
        let mut readings = Vec::with_capacity(self.gpus.len());
        for (i, gpu) in self.gpus.iter().enumerate() {
            let (mut reading, error) = read(gpu);
            reading.xid_errors = state.xids[i];
            if reading.responding != state.answering[i] {
                state.answering[i] = reading.responding;
                match error {
                    Some(e) => {
                        tracing::warn!(gpu = gpu.index, error.message = %e, "GPU stopped answering")
                    }
                    None => tracing::info!(gpu = gpu.index, "GPU answers again"),
                }
            }
            readings.push(reading);
        }
        readings
    }

    fn inject(&self, _index: u32, _fault: GpuFault) -> Result<(), GpuError> {
        Err(GpuError::NotSimulated)
    }

    fn set_busy(&self, _index: u32, _busy: bool) {}
}

fn open(nvml: &'static Nvml, index: u32) -> NvmlGpu {
    match nvml.device_by_index(index) {
        Ok(device) => NvmlGpu {
            index,
            uuid: device
                .uuid()
                .unwrap_or_else(|_| format!("GPU-nvml-index-{index}")),
            name: device.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
            device: Some(device),
        },
        Err(e) => {
            tracing::warn!(gpu = index, error.message = %e, "cannot open GPU");
            NvmlGpu {
                index,
                device: None,
                uuid: format!("GPU-nvml-index-{index}"),
                name: "NVIDIA GPU".into(),
            }
        }
    }
}

/// One reading, and the error that made the device count as not responding.
fn read(gpu: &NvmlGpu) -> (GpuReading, Option<String>) {
    let mut r = GpuReading {
        index: gpu.index,
        uuid: gpu.uuid.clone(),
        name: gpu.name.clone(),
        responding: false,
        utilization_pct: 0,
        memory_used_mb: 0,
        memory_total_mb: 0,
        temperature_c: 0,
        power_w: 0.0,
        ecc_uncorrected: 0,
        xid_errors: 0,
        hw_slowdown: false,
        fault: None,
    };
    let Some(device) = &gpu.device else {
        return (r, Some("device could not be opened".into()));
    };
    match gauges(device, &mut r) {
        Ok(()) => {
            r.responding = true;
            (r, None)
        }
        Err(e) => (r, Some(e.to_string())),
    }
}

/// Fills the gauges; a metric the device does not support reads as 0, any other error fails.
fn gauges(d: &Device<'_>, r: &mut GpuReading) -> Result<(), NvmlError> {
    r.utilization_pct = optional(d.utilization_rates())?.map_or(0, |u| u.gpu);
    if let Some(m) = optional(d.memory_info())? {
        r.memory_used_mb = m.used / MIB;
        r.memory_total_mb = m.total / MIB;
    }
    r.temperature_c = optional(d.temperature(TemperatureSensor::Gpu))?.unwrap_or(0);
    r.power_w = optional(d.power_usage())?.map_or(0.0, |mw| f64::from(mw) / 1000.0);
    r.ecc_uncorrected =
        optional(d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile))?.unwrap_or(0);
    r.hw_slowdown = optional(d.current_throttle_reasons())?.is_some_and(hw_slowdown);
    Ok(())
}

fn optional<T>(result: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => Err(e),
    }
}

fn hw_slowdown(reasons: ThrottleReasons) -> bool {
    reasons.intersects(HW_SLOWDOWN)
}

/// Whether an XID means the GPU itself is in trouble (unknown codes count as such).
fn is_critical(xid: Option<u64>) -> bool {
    !xid.is_some_and(|xid| APPLICATION_XIDS.contains(&xid))
}

/// Registers every GPU that supports it for critical XID events, in one set. A device that
/// refuses registration is left out (registration failure frees the set, so it starts over).
#[cfg(target_os = "linux")]
fn watch_xids(nvml: &'static Nvml, gpus: &[NvmlGpu]) -> Option<EventSet<'static>> {
    let mut candidates: Vec<&NvmlGpu> = Vec::new();
    for gpu in gpus {
        let supported = gpu.device.as_ref().is_some_and(|d| {
            d.supported_event_types()
                .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR))
        });
        if supported {
            candidates.push(gpu);
        } else {
            tracing::info!(
                gpu = gpu.index,
                "critical XID events are not supported on this GPU; its XID count stays 0"
            );
        }
    }
    while !candidates.is_empty() {
        let mut set = match nvml.create_event_set() {
            Ok(set) => Some(set),
            Err(e) => {
                tracing::info!(error.message = %e, "cannot watch critical XID events");
                return None;
            }
        };
        let mut refused = None;
        for (pos, gpu) in candidates.iter().enumerate() {
            let (Some(device), Some(s)) = (&gpu.device, set.take()) else {
                break;
            };
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, s) {
                Ok(s) => set = Some(s),
                Err(e) => {
                    tracing::info!(
                        gpu = gpu.index,
                        error.message = %e.error,
                        "cannot watch critical XID events on this GPU; its XID count stays 0"
                    );
                    refused = Some(pos);
                    break;
                }
            }
        }
        match refused {
            Some(pos) => {
                candidates.remove(pos);
            }
            None => return set,
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn watch_xids(_nvml: &'static Nvml, _gpus: &[NvmlGpu]) -> Option<EventSet<'static>> {
    tracing::info!("critical XID events are only watched on Linux; XID counts stay 0");
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hardware_throttling_counts_as_slowdown() {
        assert!(!hw_slowdown(ThrottleReasons::empty()));
        assert!(!hw_slowdown(
            ThrottleReasons::SW_POWER_CAP | ThrottleReasons::GPU_IDLE
        ));
        assert!(!hw_slowdown(ThrottleReasons::SW_THERMAL_SLOWDOWN));
        for hw in [
            ThrottleReasons::HW_SLOWDOWN,
            ThrottleReasons::HW_THERMAL_SLOWDOWN,
            ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        ] {
            assert!(hw_slowdown(hw | ThrottleReasons::GPU_IDLE), "{hw:?}");
        }
    }

    #[test]
    fn application_xids_do_not_count_but_hardware_and_unknown_ones_do() {
        for xid in APPLICATION_XIDS {
            assert!(!is_critical(Some(xid)), "{xid}");
        }
        assert!(is_critical(Some(48)), "double-bit ECC error");
        assert!(is_critical(Some(79)), "fallen off the bus");
        assert!(is_critical(None));
    }

    #[test]
    fn an_unsupported_metric_reads_as_absent_but_other_errors_fail() {
        assert_eq!(optional(Ok::<u32, NvmlError>(3)).unwrap(), Some(3));
        assert_eq!(optional::<u32>(Err(NvmlError::NotSupported)).unwrap(), None);
        assert!(matches!(
            optional::<u32>(Err(NvmlError::GpuLost)),
            Err(NvmlError::GpuLost)
        ));
    }

    #[test]
    fn a_device_that_could_not_be_opened_reads_as_not_responding() {
        let gpu = NvmlGpu {
            index: 3,
            device: None,
            uuid: "GPU-nvml-index-3".into(),
            name: "NVIDIA GPU".into(),
        };
        let (r, error) = read(&gpu);
        assert!(!r.responding && error.is_some());
        assert_eq!((r.index, r.uuid.as_str()), (3, "GPU-nvml-index-3"));
    }

    #[test]
    fn without_a_driver_init_fails_cleanly_and_can_be_retried() {
        // On a machine with an NVIDIA driver this finds real GPUs instead.
        for _ in 0..2 {
            match NvmlBackend::init() {
                Ok(b) => assert!(b.count() >= 1 && b.sample().len() == b.count() as usize),
                Err(GpuError::Nvml(msg)) => assert!(msg.starts_with("cannot initialise"), "{msg}"),
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }
}
