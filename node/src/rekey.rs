//! IPsec key rotation: on a timer (`--ipsec-rekey-interval`), on SIGUSR1,
//! and on request (`weftctl node rekey` on the control socket). Each
//! rotation:
//!
//! 1. makes a new key pair with the next epoch and stores it (a failure
//!    here changes nothing);
//! 2. installs the inbound SAs for it with a full reconcile pass, before
//!    any peer can know the new key;
//! 3. publishes the public key and epoch in the lease;
//! 4. tells the backend, which then switches the outbound SAs after its
//!    switch delay and drops the old inbound ones after the grace period.
//!
//! The backend also asks for a rotation when outbound SAs were lost (see
//! `weft_backends::ipsec`): after a reboot with the stored key, when
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
use weft_backends::{Backend, Ipsec, LocalNode};
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

/// A request for a rotation; the answer is the new epoch or why not.
pub type RekeyRequest = oneshot::Sender<Result<u64, String>>;

/// What a rotation needs.
#[derive(Debug)]
pub struct Rekeyer {
    pub ipsec: Arc<Ipsec>,
    pub state_dir: PathBuf,
    pub kicker: Kicker,
    pub client: ControllerClient,
    pub node_name: String,
    pub public_ip: Ipv4Addr,
    pub local: watch::Receiver<Option<Arc<LocalNode>>>,
    pub status: Arc<Status>,
}

impl Rekeyer {
    /// One rotation; returns the new epoch.
    pub async fn rotate(&self, why: &str) -> Result<u64> {
        let old = self.ipsec.epoch();
        let new = NodeKey::generate(old + 1).map_err(|e| anyhow!(e))?;
        let epoch = new.epoch();
        let public = keystore::public_b64(&new);
        keystore::store(&self.state_dir, keystore::IPSEC, &new)
            .context("storing the new IPsec key")?;
        self.ipsec.rotate(new);
        tracing::info!(
            epoch,
            reason = why,
            "rotating the IPsec key: installing inbound SAs for it"
        );
        for attempt in 1..=3 {
            match self.kicker.full_pass().await {
                Some(o) if o.errors.is_empty() => break,
                Some(o) if attempt < 3 => {
                    tracing::warn!(errors = ?o.errors, "reconcile before publishing the new key had errors; trying again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Some(o) => {
                    tracing::warn!(errors = ?o.errors, "publishing the new key although the last pass had errors (peers they concern may lose traffic until the next pass)");
                }
                None => return Err(anyhow!("the reconcile loop has stopped")),
            }
        }
        let subnet = self
            .local
            .borrow()
            .as_ref()
            .map(|l| l.subnet)
            .context("no lease yet")?;
        let req = AcquireRequest::new(
            Some(self.public_ip),
            None,
            &self.ipsec.lease_data(&self.node_name),
            Some(&subnet),
        );
        let resp = until_ok("publishing the new IPsec key in our lease", || {
            self.client.acquire(&self.node_name, &req)
        })
        .await;
        if resp.lease.key != subnet {
            tracing::warn!(
                old = %subnet.to_cidrs(),
                new = %resp.lease.key.to_cidrs(),
                "the controller moved this node while publishing the key; the lease keeper takes over"
            );
        }
        self.ipsec.published(epoch);
        self.status.ipsec_rekeys.inc();
        self.status.ipsec_keys(&self.ipsec.key_status());
        tracing::info!(epoch, public_key = %public, "IPsec key rotated and published; peers switch over within seconds");
        Ok(epoch)
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
                c = self.ipsec.rekey_wanted() => {
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
                tracing::error!("IPsec key rotation failed: {e:#}; the current key stays in use");
                if let Some(c) = cause.take() {
                    // Still wanted: try again (after the spacing).
                    self.ipsec.rekey_wanted_again(c);
                }
            }
            if let Some(reply) = reply {
                let _ = reply.send(r.map_err(|e| format!("{e:#}")));
            }
        }
    }
}
