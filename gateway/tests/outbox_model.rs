//! The outbox against a model: random sequences of appends, deliveries that succeed, fail for
//! a while or refuse an event for good, and restarts, on a real SQLite file. Nothing is lost,
//! nothing is delivered out of order, and the dead letters are exactly the refused events.

use proptest::prelude::*;
use umeme_gateway::config::Tariff;
use umeme_gateway::ledger::Rules;
use umeme_gateway::meter::MeterId;
use umeme_gateway::outbox::{next_batch, settle, Delivery};
use umeme_gateway::store;
use umeme_gateway::writer::{apply_now, Credit, LedgerSettings, Op};

#[derive(Debug, Clone)]
enum Step {
    /// A payment (never dropped) or a status report (telemetry).
    Append { payment: bool },
    /// The sink takes the next batch.
    DeliverOk,
    /// The sink fails the next batch (nothing of it counts).
    DeliverRetry,
    /// The sink refuses the event at this position of the next batch for good.
    DeliverRejecting(usize),
    /// The gateway restarts: connections reopened, cursor read back from the file.
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<bool>().prop_map(|payment| Step::Append { payment }),
        3 => Just(Step::DeliverOk),
        1 => Just(Step::DeliverRetry),
        1 => (0usize..8).prop_map(Step::DeliverRejecting),
        1 => Just(Step::Restart),
    ]
}

struct Harness {
    path: std::path::PathBuf,
    writer: rusqlite::Connection,
    reader: rusqlite::Connection,
    settings: LedgerSettings,
    cursor: i64,
    refs: u32,
}

const SINK: &str = "model";
const GW: &str = "model-site";

impl Harness {
    fn open(path: std::path::PathBuf) -> Harness {
        let writer = store::open(&path, GW).unwrap();
        let reader = store::open_read_only(&path).unwrap();
        let cursor = store::sink_cursor(&reader, SINK).unwrap();
        Harness {
            path,
            writer,
            reader,
            settings: LedgerSettings {
                rules: Rules { low_balance_wh: 0 },
                tariff: Tariff::try_from(0.05).unwrap(),
            },
            cursor,
            refs: 0,
        }
    }

    fn apply(&mut self, op: Op) {
        apply_now(&mut self.writer, &op, &self.settings).unwrap();
    }

    fn meter() -> MeterId {
        MeterId::parse("M1").unwrap()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn outbox_matches_its_model(steps in prop::collection::vec(step(), 1..80), batch in 1usize..6) {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::open(dir.path().join("gateway.db"));
        let hash = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".to_string();
        h.apply(Op::AddMeter { meter: Harness::meter(), name: None, phone: None, secret_hash: hash, at: 1 });
        let base = store::last_event_seq(&h.reader).unwrap();
        h.apply(Op::SinkProgress { sink: SINK.into(), through: base, delivered: 0, dead: vec![], at: 1 });
        h.cursor = base;

        // The model: every appended seq, what the sink has taken, what it refused.
        let mut appended: Vec<i64> = Vec::new();
        let mut received: Vec<i64> = Vec::new();
        let mut refused: Vec<i64> = Vec::new();
        let kinds: Vec<String> = ["payment", "status"].iter().map(|s| s.to_string()).collect();

        for s in steps.iter().cloned().chain(std::iter::repeat_n(Step::DeliverOk, 100)) {
            match s {
                Step::Append { payment } => {
                    let op = if payment {
                        h.refs += 1;
                        Op::Credit(Credit { meter: Harness::meter(), source: "model".into(),
                            reference: format!("R{}", h.refs), amount_cents: 100, at: 2, phone: None })
                    } else {
                        Op::Presence { meter: Harness::meter(), online: h.refs % 2 == 0, at: 2 }
                    };
                    h.apply(op);
                    appended.push(store::last_event_seq(&h.reader).unwrap());
                }
                Step::Restart => {
                    let path = h.path.clone();
                    let refs = h.refs;
                    drop(h);
                    h = Harness::open(path);
                    h.refs = refs;
                }
                deliver => {
                    let Some((last, events)) = next_batch(&h.reader, GW, h.cursor, &kinds, batch).unwrap() else {
                        continue;
                    };
                    let delivery = match deliver {
                        Step::DeliverRetry => Delivery::Retry { after: None, error: "down".into() },
                        Step::DeliverRejecting(i) if !events.is_empty() => {
                            let e = &events[i % events.len()];
                            Delivery::Rejected(vec![(e.seq, "bad event".into())])
                        }
                        _ => Delivery::Delivered,
                    };
                    let rejected: Vec<i64> = match &delivery {
                        Delivery::Rejected(l) => l.iter().map(|x| x.0).collect(),
                        _ => vec![],
                    };
                    if let Ok(op) = settle(SINK, last, &events, delivery) {
                            h.apply(op);
                            h.cursor = last;
                            for e in &events {
                                if rejected.contains(&e.seq) {
                                    refused.push(e.seq);
                                } else {
                                    received.push(e.seq);
                                }
                            }
                    }
                }
            }
        }
        // In order, nothing twice, nothing lost: received ∪ refused = appended.
        prop_assert!(received.windows(2).all(|w| w[0] < w[1]), "out of order: {received:?}");
        let mut all: Vec<i64> = received.iter().chain(&refused).copied().collect();
        all.sort_unstable();
        prop_assert_eq!(&all, &appended);
        let dead: Vec<i64> = store::dead_letters(&h.reader, SINK).unwrap().into_iter().map(|d| d.0).collect();
        prop_assert_eq!(dead, refused);
        prop_assert_eq!(store::sink_cursor(&h.reader, SINK).unwrap(), h.cursor);
    }
}
