//! Key rotation for the backends with a key pair (ipsec, wireguard): on a
//! timer (`--ipsec-rekey-interval`, `--wireguard-rekey-interval`), on
//! SIGUSR1, and on request (`weftctl node rekey` on the control socket).
//! Each rotation:
//!
//! 1. makes a new key pair with the next epoch and stores it (a failure
//!    here changes nothing);
//! 2. puts it in place with a full reconcile pass, before any peer can know
//!    the new key: ipsec installs the inbound SAs for it; wireguard sets it
//!    on the device (the kernel keeps receiving on the sessions of the old
//!    key, and holds what it sends until a handshake with the new one
//!    succeeds);
//! 3. publishes the public key in the lease, where peers see it within
//!    the controller's fan-out;
//! 4. ipsec: tells the backend, which then switches the outbound SAs after
//!    its switch delay and drops the old inbound ones after the grace
//!    period.
//!
//! The ipsec backend also asks for a rotation when outbound SAs were lost
//! (see `weft_backends::ipsec`): after a reboot with the stored key, when
//! someone deleted them, or when a peer returns with the same key; and
//! when two peers' inbound SAs drew the same SPI.

use crate::keystore;
use crate::reconcile::Kicker;
use crate::retry::until_ok;
use crate::status::Status;
use anyhow::{anyhow, Context, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use weft_backends::ipsec::keys::NodeKey;
use weft_backends::ipsec::RekeyCause;
use weft_backends::{Keyed, LocalNode};
use weft_lease::api::AcquireRequest;
use weft_lease::client::ControllerClient;

fn ips(peers: &[Ipv4Addr]) -> String {
    peers
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The least time between two rotations the backend asked for.
const REPAIR_SPACING: Duration = Duration::from_secs(30);

/// How long a wireguard rotation may take to reach the controller and to
/// publish its key before it is undone.
const PUBLISH_WITHIN: Duration = Duration::from_secs(20);

/// A request for a rotation; the answer is the new epoch or why not.
pub type RekeyRequest = oneshot::Sender<Result<u64, String>>;

/// The lease carries `epoch` now: the backend and the metrics learn it.
fn record_published(keyed: &Keyed, epoch: u64, status: &Status) {
    match keyed {
        Keyed::Ipsec(i) => {
            i.published(epoch);
            status.ipsec_rekeys.inc();
            status.ipsec_keys(&i.key_status());
        }
        Keyed::Wireguard(..) => {
            status.wireguard_rekeys.inc();
        }
    }
}

/// What a rotation needs.
#[derive(Debug)]
pub struct Rekeyer {
    pub keyed: Keyed,
    pub state_dir: PathBuf,
    pub kicker: Kicker,
    pub client: ControllerClient,
    pub node_name: String,
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    pub local: watch::Receiver<Option<Arc<LocalNode>>>,
    pub status: Arc<Status>,
}

impl Rekeyer {
    /// One rotation; returns the new epoch.
    ///
    /// wireguard cannot receive with the old key once the device has the
    /// new one (ipsec keeps its old inbound SAs), so for wireguard a
    /// rotation is undone rather than left half-way: it starts only when
    /// the controller answers, and if the new key cannot be set on the
    /// device or published within [`PUBLISH_WITHIN`], the old key goes
    /// back on the device and in the key file.
    pub async fn rotate(&self, why: &str) -> Result<u64> {
        let what = self.keyed.which().what;
        let wireguard = matches!(self.keyed, Keyed::Wireguard(..));
        if wireguard {
            tokio::time::timeout(PUBLISH_WITHIN, self.client.renew(&self.node_name))
                .await
                .map_err(|_| anyhow!("the controller did not answer within {PUBLISH_WITHIN:?}"))?
                .context("the controller cannot publish a new key now")?;
        }
        let key_file = keystore::path(&self.state_dir, self.keyed.which());
        let previous =
            keystore::load(&key_file).with_context(|| format!("reading the current {what} key"))?;
        let old = self.keyed.epoch();
        let new = NodeKey::generate(old + 1).map_err(|e| anyhow!(e))?;
        let epoch = new.epoch();
        let public = keystore::public_b64(&new);
        keystore::store(&self.state_dir, self.keyed.which(), &new)
            .with_context(|| format!("storing the new {what} key"))?;
        self.keyed.switch(new);
        let step = match self.keyed {
            Keyed::Ipsec(_) => "installing inbound SAs for it",
            Keyed::Wireguard(..) => "setting it on the device",
        };
        tracing::info!(epoch, reason = why, "rotating the {what} key: {step}");
        let mut clean = false;
        for attempt in 1..=3 {
            match self.kicker.full_pass().await {
                Some(o) if o.errors.is_empty() => {
                    clean = true;
                    break;
                }
                Some(o) if attempt < 3 => {
                    tracing::warn!(errors = ?o.errors, "reconcile before publishing the new key had errors; trying again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Some(o) if wireguard => {
                    tracing::warn!(errors = ?o.errors, "the new key may not be on the device");
                }
                Some(o) => {
                    tracing::warn!(errors = ?o.errors, "publishing the new key although the last pass had errors (peers they concern may lose traffic until the next pass)");
                    clean = true;
                }
                None => return Err(anyhow!("the reconcile loop has stopped")),
            }
        }
        if !clean {
            return Err(self
                .undo(previous, "the passes that set it had errors")
                .await);
        }
        self.keyed.publish();
        let subnet = self
            .local
            .borrow()
            .as_ref()
            .map(|l| l.subnet)
            .context("no lease yet")?;
        let req = AcquireRequest::new(
            Some(self.public_ip),
            self.public_ipv6,
            &self.keyed.backend().lease_data(&self.node_name),
            Some(&subnet),
        );
        let publish = until_ok("publishing the new key in our lease", || {
            self.client.acquire(&self.node_name, &req)
        });
        let resp = if wireguard {
            match tokio::time::timeout(PUBLISH_WITHIN, publish).await {
                Ok(resp) => resp,
                Err(_) => {
                    return Err(self
                        .undo(previous, "it could not be published in time")
                        .await)
                }
            }
        } else {
            publish.await
        };
        if resp.lease.key != subnet {
            tracing::warn!(
                old = %subnet.to_cidrs(),
                new = %resp.lease.key.to_cidrs(),
                "the controller moved this node while publishing the key; the lease keeper takes over"
            );
        }
        record_published(&self.keyed, epoch, &self.status);
        tracing::info!(epoch, public_key = %public, "{what} key rotated and published; peers switch over within seconds");
        Ok(epoch)
    }

    /// Puts the key from before a wireguard rotation back (file, backend,
    /// device, lease data) and says why the rotation failed.
    async fn undo(&self, previous: Option<NodeKey>, why: &str) -> anyhow::Error {
        let what = self.keyed.which().what;
        let Some(old) = previous else {
            return anyhow!("{why}; there was no key file to go back to");
        };
        let back = keystore::store(&self.state_dir, self.keyed.which(), &old);
        self.keyed.switch(old);
        self.keyed.publish();
        let pass = self.kicker.full_pass().await;
        tracing::warn!(
            reason = why,
            stored = back.is_ok(),
            pass_errors = ?pass.map(|o| o.errors),
            "the new {what} key is undone: the old one is back on the device and in the key file"
        );
        match back {
            Ok(()) => anyhow!("{why}; the old key is back in use"),
            Err(e) => {
                anyhow!("{why}; the old key is back on the device but not in the key file: {e}")
            }
        }
    }

    /// Rotates on every trigger until the daemon stops. `interval` zero:
    /// no timer.
    pub async fn run(self, interval: Duration, mut requests: mpsc::Receiver<RekeyRequest>) {
        let mut usr1 =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("no SIGUSR1 handler ({e}); rotate with weftctl node rekey");
                    None
                }
            };
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        let period = if interval.is_zero() { far } else { interval };
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listening = true;
        let mut last_repair: Option<tokio::time::Instant> = None;
        loop {
            let mut cause = None;
            let (why, reply) = tokio::select! {
                _ = timer.tick() => ("timer", None),
                c = self.keyed.wanted() => {
                    let why = match &c {
                        RekeyCause::LostOutbound(peers) => {
                            tracing::warn!(
                                peers = %ips(peers),
                                "outbound IPsec SAs were lost (a reboot, a flush, a hand deletion, or a peer back with the same key); put back they would restart their sequence numbers and the peers would drop them as replays, so rotating the key"
                            );
                            "outbound SAs lost"
                        }
                        RekeyCause::SpiCollision(peers) => {
                            tracing::warn!(
                                peers = %ips(peers),
                                "these peers' inbound IPsec SAs drew an SPI another peer's already has, so they are not installed; rotating the key for new SPIs"
                            );
                            "inbound SPI collision"
                        }
                    };
                    // Someone flushing SAs over and over must not make
                    // this node rotate over and over.
                    if let Some(wait) = last_repair
                        .map(|t| t + REPAIR_SPACING)
                        .filter(|t| *t > tokio::time::Instant::now())
                    {
                        tracing::warn!("the last such rotation was under {REPAIR_SPACING:?} ago; waiting");
                        tokio::time::sleep_until(wait).await;
                    }
                    last_repair = Some(tokio::time::Instant::now());
                    cause = Some(c);
                    (why, None)
                }
                Some(()) = async { match usr1.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => ("SIGUSR1", None),
                r = requests.recv(), if listening => match r {
                    Some(reply) => ("request", Some(reply)),
                    None => ("", None),
                },
            };
            if why.is_empty() {
                // No control socket; timer and signal still work.
                listening = false;
                continue;
            }
            let r = self.rotate(why).await;
            if let Err(e) = &r {
                tracing::error!(
                    "{} key rotation failed: {e:#}; the current key stays in use",
                    self.keyed.which().what
                );
                if let (Some(c), Some(i)) = (cause.take(), self.keyed.ipsec()) {
                    // Still wanted: try again (after the spacing).
                    i.rekey_wanted_again(c);
                }
            }
            if let Some(reply) = reply {
                let _ = reply.send(r.map_err(|e| format!("{e:#}")));
            }
        }
    }
}
