//! Query engine tests: three nodes wired by hand, synthetic time.

use super::*;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);

fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ask(name: &str, filter: Filter, targets: &[NodeId], expected: &[NodeId]) -> Ask {
    Ask {
        name: name.into(),
        payload: Bytes::from_static(b"ping"),
        filter,
        timeout: Duration::from_secs(1),
        targets: targets.to_vec(),
        expected: expected.to_vec(),
    }
}

fn drain(q: &mut Queries) -> (Vec<Transmit>, Vec<QueryEvent>) {
    (
        std::iter::from_fn(|| q.poll_action()).collect(),
        std::iter::from_fn(|| q.poll_event()).collect(),
    )
}

/// Passes every transmit of `from` to its recipient; returns the
/// recipients' transmits in turn (not delivered).
fn deliver(
    now: Instant,
    sender: NodeId,
    out: Vec<Transmit>,
    nodes: &mut [(NodeId, &mut Queries, Tags)],
) -> Vec<(NodeId, Transmit)> {
    let mut next = Vec::new();
    for t in out {
        let Some((id, q, tg)) = nodes.iter_mut().find(|(id, _, _)| *id == t.to) else {
            continue;
        };
        let name = format!("n{}", id.0);
        let local = Local {
            name: &name,
            tags: tg,
        };
        match t.msg {
            QueryMessage::Query(m) => q.on_query(now, sender, m, local, &[]),
            QueryMessage::Response(r) => q.on_response(now, sender, r),
        }
        while let Some(t) = q.poll_action() {
            next.push((*id, t));
        }
    }
    next
}

#[test]
fn a_filtered_query_is_acked_and_answered_once_by_matching_nodes_only() {
    let t0 = Instant::now();
    let mut a = Queries::new(A, "n1", Limits::default());
    let mut b = Queries::new(B, "n2", Limits::default());
    let mut c = Queries::new(C, "n3", Limits::default());
    let filter = Filter {
        nodes: vec![],
        tags: vec![("role".into(), "db".into())],
    };
    let none = Tags::new();
    let id = a
        .ask(
            t0,
            ask("load", filter, &[B, C], &[B]),
            Local {
                name: "n1",
                tags: &none,
            },
        )
        .unwrap();
    let (out, ev) = drain(&mut a);
    assert_eq!(out.len(), 2);
    assert!(ev.is_empty(), "the asker does not match: {ev:?}");
    let db = tags(&[("role", "db")]);
    let web = tags(&[("role", "web")]);
    // The same frames twice: the second copy is a duplicate.
    let twice: Vec<Transmit> = out.iter().cloned().chain(out.iter().cloned()).collect();
    let back = {
        let mut nodes = [(B, &mut b, db.clone()), (C, &mut c, web.clone())];
        deliver(t0, A, twice, &mut nodes)
    };
    assert_eq!(b.stats().duplicates, 1);
    assert_eq!(back.len(), 1, "only b acks: {back:?}");
    let (_, ev_b) = drain(&mut b);
    let (_, ev_c) = drain(&mut c);
    assert!(ev_c.is_empty());
    let [QueryEvent::Deliver {
        origin,
        id: qid,
        name,
        payload,
        ..
    }] = &ev_b[..]
    else {
        panic!("{ev_b:?}");
    };
    assert_eq!(
        (*origin, *qid, name.as_str(), &payload[..]),
        (A, id, "load", &b"ping"[..])
    );
    b.respond(t0, A, id, Bytes::from_static(b"0.5")).unwrap();
    assert_eq!(
        b.respond(t0, A, id, Bytes::from_static(b"again")),
        Err(RespondError::Answered),
        "a node never answers twice"
    );
    let (answer, _) = drain(&mut b);
    for (from, t) in back.into_iter().chain(answer.into_iter().map(|t| (B, t))) {
        let QueryMessage::Response(r) = t.msg else {
            panic!()
        };
        a.on_response(t0, from, r);
    }
    let (_, ev) = drain(&mut a);
    assert!(
        matches!(&ev[0], QueryEvent::Ack { from, .. } if *from == B),
        "{ev:?}"
    );
    assert!(
        matches!(&ev[1], QueryEvent::Answer { from, payload, .. } if *from == B && &payload[..] == b"0.5"),
        "{ev:?}"
    );
    // Every expected node answered: done before the timeout.
    let QueryEvent::Done { summary, .. } = &ev[2] else {
        panic!("{ev:?}")
    };
    assert_eq!((summary.asked, summary.acked, summary.answered), (1, 1, 1));
    assert!(summary.timed_out.is_empty());
    assert_eq!(a.outstanding(), 0);
}

#[test]
fn the_timeout_decides_with_now_and_names_who_did_not_answer() {
    let t0 = Instant::now();
    let none = Tags::new();
    let mut a = Queries::new(A, "n1", Limits::default());
    let id = a
        .ask(
            t0,
            ask("x", Filter::default(), &[B, C], &[A, B, C]),
            Local {
                name: "n1",
                tags: &none,
            },
        )
        .unwrap();
    let (_, ev) = drain(&mut a);
    assert!(
        matches!(ev[0], QueryEvent::Deliver { .. }),
        "the asker matches: {ev:?}"
    );
    assert!(matches!(ev[1], QueryEvent::Ack { from: A, .. }), "{ev:?}");
    a.respond(t0, A, id, Bytes::from_static(b"me")).unwrap();
    drain(&mut a);
    assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(1)));
    a.on_tick(t0 + Duration::from_millis(999));
    assert_eq!(drain(&mut a).1, vec![]);
    a.on_tick(t0 + Duration::from_secs(1));
    let (_, ev) = drain(&mut a);
    let [QueryEvent::Done { summary, .. }] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!((summary.asked, summary.acked, summary.answered), (3, 1, 1));
    assert_eq!(summary.timed_out, vec![B, C]);
    // A late answer changes nothing and is counted.
    a.on_response(
        t0 + Duration::from_secs(2),
        B,
        QueryResponse {
            origin: A,
            id,
            from: B,
            from_name: "n2".into(),
            kind: ResponseKind::Answer,
            payload: Bytes::new(),
            ttl: 0,
        },
    );
    assert_eq!(a.stats().late, 1);
    assert_eq!(drain(&mut a).1, vec![]);
}

#[test]
fn bounds_are_enforced_and_answers_after_the_deadline_refused() {
    let t0 = Instant::now();
    let none = Tags::new();
    let local = Local {
        name: "n1",
        tags: &none,
    };
    let limits = Limits {
        max_outstanding: 1,
        max_payload: 8,
        ..Limits::default()
    };
    let mut a = Queries::new(A, "n1", limits);
    assert_eq!(
        a.ask(t0, ask("_keys", Filter::default(), &[], &[]), local),
        Err(AskError::Reserved)
    );
    let mut big = ask("x", Filter::default(), &[], &[]);
    big.payload = Bytes::from(vec![0; 9]);
    assert_eq!(a.ask(t0, big, local), Err(AskError::TooLarge(9, 8)));
    let id = a
        .ask(t0, ask("x", Filter::default(), &[], &[]), local)
        .unwrap();
    assert_eq!(
        a.ask(t0, ask("y", Filter::default(), &[], &[]), local),
        Err(AskError::Busy(1))
    );
    assert_eq!(
        a.respond(t0 + Duration::from_secs(1), A, id, Bytes::new()),
        Err(RespondError::Late)
    );
    assert_eq!(
        a.respond(t0, B, 7, Bytes::new()),
        Err(RespondError::Unknown)
    );
}

#[test]
fn a_forwarded_query_reaches_a_node_two_hops_away_and_its_answer_comes_back() {
    // a - b - c: a asks with ttl 1 through b (an overlay, not today's mesh).
    let t0 = Instant::now();
    let none = Tags::new();
    let mut b = Queries::new(B, "n2", Limits::default());
    let mut c = Queries::new(C, "n3", Limits::default());
    let q = Query {
        origin: A,
        origin_name: "n1".into(),
        id: 9,
        name: "x".into(),
        payload: Bytes::new(),
        filter: Filter {
            nodes: vec!["n3".into()],
            tags: vec![],
        },
        timeout_ms: 500,
        ttl: 1,
    };
    b.on_query(
        t0,
        A,
        q,
        Local {
            name: "n2",
            tags: &none,
        },
        &[A, C],
    );
    let (out, ev) = drain(&mut b);
    assert!(ev.is_empty(), "b does not match");
    let [Transmit {
        to: C,
        msg: QueryMessage::Query(fwd),
    }] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(fwd.ttl, 0);
    c.on_query(
        t0,
        B,
        fwd.clone(),
        Local {
            name: "n3",
            tags: &none,
        },
        &[B],
    );
    c.respond(t0, A, 9, Bytes::from_static(b"hi")).unwrap();
    let (out, _) = drain(&mut c);
    assert!(out.iter().all(|t| t.to == B), "{out:?}");
    for t in out {
        let QueryMessage::Response(r) = t.msg else {
            panic!()
        };
        b.on_response(t0, C, r);
    }
    let (out, _) = drain(&mut b);
    assert_eq!(out.len(), 2, "ack and answer relayed to a: {out:?}");
    assert!(out.iter().all(|t| t.to == A));
    assert_eq!(b.stats().forwarded, 3);
}

#[test]
fn the_duplicate_memory_is_bounded() {
    let t0 = Instant::now();
    let none = Tags::new();
    let limits = Limits {
        max_seen: 4,
        ..Limits::default()
    };
    let mut b = Queries::new(B, "n2", limits);
    for i in 0..100 {
        let q = Query {
            origin: A,
            origin_name: String::new(),
            id: i,
            name: "x".into(),
            payload: Bytes::new(),
            filter: Filter::default(),
            timeout_ms: 60_000,
            ttl: 0,
        };
        b.on_query(
            t0,
            A,
            q,
            Local {
                name: "n2",
                tags: &none,
            },
            &[],
        );
    }
    assert!(b.seen.len() <= 4 && b.delivered.len() <= 4);
    b.on_tick(t0 + Duration::from_secs(61) + REMEMBER_LATE);
    assert!(b.seen.is_empty() && b.delivered.is_empty());
    assert_eq!(b.next_deadline(), None);
}
