//! Which master the store settles on, against a real master, replica and sentinel, with a
//! stand-in sentinel that names the replica or never answers.

use super::*;
use test_support::{FakeSentinel, RedisOptions, RedisServer, SENTINEL_MASTER};

fn store(nodes: &[String]) -> RedisStore {
    let mut settings = RedisSettings::sentinel(nodes, SENTINEL_MASTER).unwrap();
    settings.timeout = Duration::from_millis(300);
    RedisStore::new(&settings, Arc::new(LimitCounters::default())).unwrap()
}

/// The port of the master the store sends decisions to, if any.
fn master_port(store: &RedisStore) -> Option<u16> {
    store.master.load().as_ref()?.address.as_ref().map(|a| a.1)
}

#[tokio::test]
async fn a_sentinel_naming_a_replica_is_passed_over_and_asked_last() {
    let master = RedisServer::start();
    let replica = RedisServer::start_with(RedisOptions {
        replica_of: Some(master.port()),
        ..Default::default()
    });
    let stale = FakeSentinel::naming(replica.port());
    let also_stale = FakeSentinel::naming(replica.port());
    let sentinel = RedisServer::sentinel(master.port());

    let store = store(&[stale.url(), also_stale.url(), sentinel.url()]);
    let _ = store.resolve().await;
    assert_eq!(stale.connections(), 1, "the stale sentinel was asked first");
    assert_eq!(also_stale.connections(), 1);
    assert_eq!(master_port(&store), Some(master.port()));
    // The replica was asked its role once, not once per sentinel naming it.
    let role_calls = |server: &RedisServer| {
        let stats = server.command("INFO commandstats").unwrap_or_default();
        stats
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_role:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u32>().ok())
            .unwrap_or(0)
    };
    assert_eq!(role_calls(&replica), 1);
    assert!(store.probe().await, "the master answers");
    // The probe asked the other sentinels once more (a master was named: are they
    // usable?), each over a new connection: only the one whose answer is used keeps its own.
    let asked = stale.questions() + also_stale.questions();
    assert_eq!(asked, 4);
    assert_eq!(stale.connections() + also_stale.connections(), 4);
    // The sentinel whose answer was used is now asked first.
    for _ in 0..3 {
        let _ = store.resolve().await;
    }
    assert!(store.probe().await);
    assert_eq!(stale.questions() + also_stale.questions(), asked);
    assert_eq!(master_port(&store), Some(master.port()));
    assert_eq!(role_calls(&replica), 1);

    // Alone, the stale sentinel gives no master: the replica is never used.
    let store = self::store(&[stale.url()]);
    let before = stale.questions();
    let _ = store.resolve().await;
    assert_eq!(stale.questions(), before + 1);
    assert_eq!(master_port(&store), None);
    assert!(!store.probe().await, "no master: not healthy");
}

#[tokio::test]
async fn a_dead_first_sentinel_is_waited_for_once_not_at_every_question() {
    let master = RedisServer::start();
    let dead = FakeSentinel::silent();
    let sentinel = RedisServer::sentinel(master.port());

    let store = store(&[dead.url(), sentinel.url()]);
    for _ in 0..4 {
        let _ = store.resolve().await;
        assert_eq!(master_port(&store), Some(master.port()));
    }
    assert_eq!(dead.connections(), 1, "the silent sentinel was asked once");
}

#[tokio::test]
async fn sentinels_that_want_a_password_get_the_masters_and_are_then_asked_with_it() {
    const PASSWORD: &str = "s3cret-sentinel-password";
    let master = RedisServer::start_with(RedisOptions {
        password: Some(PASSWORD.to_owned()),
        ..Default::default()
    });
    let sentinel = RedisServer::sentinel_with(
        master.port(),
        test_support::SentinelOptions {
            auth_pass: Some(PASSWORD.to_owned()),
            password: Some(PASSWORD.to_owned()),
            ..Default::default()
        },
    );
    let mut settings = RedisSettings::sentinel(&[sentinel.url()], SENTINEL_MASTER).unwrap();
    settings.password = Some(PASSWORD.to_owned().into());
    settings.timeout = Duration::from_millis(300);
    let store = RedisStore::new(&settings, Arc::new(LimitCounters::default())).unwrap();
    let _ = store.resolve().await;
    assert_eq!(master_port(&store), Some(master.port()));
    let pool = store.sentinels.as_ref().unwrap();
    assert_eq!(pool.auth.load(Ordering::Relaxed), 1, "remembered");
    assert!(store.probe().await);

    // Without a password, neither the sentinel nor the master lets the store in.
    let store = self::store(&[sentinel.url()]);
    let _ = store.resolve().await;
    assert_eq!(master_port(&store), None);
}

/// An ACL user for the gateway on the master, and sentinels with a `requirepass` of their
/// own (the password of their `default` user) equal to that user's password: the sentinels
/// are asked with the password alone, and the master with the user.
#[tokio::test]
async fn sentinels_whose_requirepass_is_the_users_password_are_asked_with_it_alone() {
    const DATA_PASSWORD: &str = "data-nodes-default-password";
    const USER_PASSWORD: &str = "gateway-user-password";
    let master = RedisServer::start_with(RedisOptions {
        password: Some(DATA_PASSWORD.to_owned()),
        ..Default::default()
    });
    let mut connection = redis::Client::open(format!(
        "redis://:{DATA_PASSWORD}@127.0.0.1:{}",
        master.port()
    ))
    .and_then(|client| client.get_connection())
    .unwrap();
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("reset-gateway")
        .arg("on")
        .arg(format!(">{USER_PASSWORD}"))
        .arg("~*")
        .arg("+@all")
        .query(&mut connection)
        .unwrap();
    let sentinel = RedisServer::sentinel_with(
        master.port(),
        test_support::SentinelOptions {
            auth_pass: Some(DATA_PASSWORD.to_owned()),
            password: Some(USER_PASSWORD.to_owned()),
            ..Default::default()
        },
    );
    let mut settings = RedisSettings::sentinel(&[sentinel.url()], SENTINEL_MASTER).unwrap();
    settings.username = Some("reset-gateway".to_owned());
    settings.password = Some(USER_PASSWORD.to_owned().into());
    settings.timeout = Duration::from_millis(300);
    let store = RedisStore::new(&settings, Arc::new(LimitCounters::default())).unwrap();
    assert_eq!(store.resolve().await, Ok(()));
    assert_eq!(master_port(&store), Some(master.port()));
    let pool = store.sentinels.as_ref().unwrap();
    assert_eq!(
        pool.auth.load(Ordering::Relaxed),
        2,
        "the password alone, remembered"
    );
    assert!(store.probe().await);
}

/// Sentinels that name a master by something no host name is (a megabyte of letters, a
/// line break): passed over with a short reason, never connected to or logged whole; a
/// sentinel after them names the master.
#[tokio::test]
async fn a_master_named_by_no_host_name_is_passed_over_with_a_short_reason() {
    let master = RedisServer::start();
    let huge = FakeSentinel::naming_host(&"a".repeat(1 << 20), master.port());
    let broken = FakeSentinel::naming_host("127.0.0.1\nforged line", master.port());
    let store = store(&[huge.url(), broken.url()]);
    let why = store.resolve().await.unwrap_err();
    assert!(why.len() < 200, "{} characters", why.len());
    assert!(
        why.contains("sentinel 1 (") && why.contains(") names a master by no host name"),
        "{why}"
    );
    assert!(
        why.contains("sentinel 2 (")
            && why.matches(") names a master by no host name").count() == 2,
        "{why}"
    );
    assert_eq!(master_port(&store), None);

    let sentinel = RedisServer::sentinel(master.port());
    let store = self::store(&[huge.url(), sentinel.url()]);
    assert_eq!(store.resolve().await, Ok(()));
    assert_eq!(master_port(&store), Some(master.port()));
}

/// A refused password names the keys to set where the sentinels' own are not given, and
/// says that those given are wrong (or not wanted) where they are.
#[test]
fn a_refused_sentinel_password_names_the_keys_as_they_stand() {
    let refused = redis::RedisError::from((
        redis::ErrorKind::AuthenticationFailed,
        "Password authentication failed",
    ));
    let without = sentinel_hint(&refused, false);
    assert!(without.contains("differs from the master's"), "{without}");
    let given = sentinel_hint(&refused, true);
    assert!(
        given.contains("not its password, or it has none"),
        "{given}"
    );
}

/// The sentinels are asked every second (and more often while requests fail): over the
/// connection kept from the last answer, not a new one each time (a TLS handshake each,
/// and a socket left waiting to close, per gateway and second). Before, five questions and
/// a probe made six connections.
#[tokio::test]
async fn a_sentinel_is_asked_over_the_connection_kept_from_its_last_answer() {
    let master = RedisServer::start();
    let sentinel = RedisServer::sentinel(master.port());
    // Each look at the sentinel's counter is a connection of its own, counted in it.
    let received = || sentinel.connections_received();
    let store = store(&[sentinel.url()]);
    let before = received();
    for _ in 0..5 {
        store.resolve().await.unwrap();
    }
    assert!(store.probe().await);
    assert_eq!(master_port(&store), Some(master.port()));
    assert_eq!(
        received() - before,
        2,
        "one kept, and the look at the counter"
    );

    // A sentinel that closed the kept connection (its `timeout`, a restart) is asked over
    // a new one.
    let killed = sentinel
        .command("CLIENT KILL TYPE normal")
        .unwrap_or_default();
    assert!(killed.starts_with(":1"), "{killed}");
    let before = received();
    // Asked again over a new connection within the same question: with one sentinel, a
    // question that failed would leave no master named.
    assert_eq!(store.resolve().await, Ok(()));
    assert!(store.probe().await);
    assert_eq!(
        received() - before,
        2,
        "a new one kept, and the look at the counter"
    );
}
