use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::sync::OnceCell;

/// Where the test PostgreSQL and RabbitMQ are.
#[derive(Debug, Clone)]
pub struct Infra {
    /// A URL of the PostgreSQL server; its database part is replaced per test.
    pub database_url: String,
    /// The RabbitMQ URL.
    pub amqp_url: String,
    /// How they were found, for failure messages.
    pub source: &'static str,
}

impl Infra {
    /// The URL of database `name` on the test server.
    pub fn database_url_for(&self, name: &str) -> String {
        let mut url = url::Url::parse(&self.database_url).expect("valid database URL");
        url.set_path(&format!("/{name}"));
        url.to_string()
    }
}

const LOCAL_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const LOCAL_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Finds the test infrastructure once per process (see the crate docs).
pub async fn infra() -> &'static Infra {
    static INFRA: OnceCell<Infra> = OnceCell::const_new();
    INFRA.get_or_init(detect).await
}

async fn detect() -> Infra {
    let env_pg = std::env::var("TEST_DATABASE_URL").ok();
    let env_amqp = std::env::var("TEST_AMQP_URL").ok();
    if let (Some(pg), Some(amqp)) = (&env_pg, &env_amqp) {
        return Infra { database_url: pg.clone(), amqp_url: amqp.clone(), source: "environment" };
    }
    let pg_local = listening("127.0.0.1:5432");
    let amqp_local = listening("127.0.0.1:5672");
    if (env_pg.is_some() || pg_local) && (env_amqp.is_some() || amqp_local) {
        return Infra {
            database_url: env_pg.unwrap_or_else(|| LOCAL_PG.to_owned()),
            amqp_url: env_amqp.unwrap_or_else(|| LOCAL_AMQP.to_owned()),
            source: "local defaults",
        };
    }
    if docker_engine_available() {
        return containers::start().await;
    }
    panic!(
        "no PostgreSQL/RabbitMQ for tests: TEST_DATABASE_URL/TEST_AMQP_URL are not both set, \
         127.0.0.1:5432 listening={pg_local}, 127.0.0.1:5672 listening={amqp_local}, and no Docker \
         engine answers for testcontainers. Start them (`make infra-up`, or on Debian \
         `pg_ctlcluster 15 main start` and `rabbitmq-server -detached`) or set the URLs."
    );
}

fn listening(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().expect("valid socket address");
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn docker_engine_available() -> bool {
    std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

mod containers {
    use testcontainers::{ImageExt, ReuseDirective, runners::AsyncRunner};
    use testcontainers_modules::{postgres::Postgres, rabbitmq::RabbitMq};

    use super::Infra;

    /// Starts (or reuses, across test processes and runs) one PostgreSQL and
    /// one RabbitMQ container.
    pub(super) async fn start() -> Infra {
        let pg = Postgres::default()
            .with_tag("15-alpine")
            .with_container_name("orderflow-test-postgres")
            .with_reuse(ReuseDirective::Always)
            .start()
            .await
            .expect("start PostgreSQL container");
        let rabbit = RabbitMq::default()
            .with_container_name("orderflow-test-rabbitmq")
            .with_reuse(ReuseDirective::Always)
            .start()
            .await
            .expect("start RabbitMQ container");
        let pg_port = pg.get_host_port_ipv4(5432).await.expect("postgres port");
        let amqp_port = rabbit.get_host_port_ipv4(5672).await.expect("rabbitmq port");
        // Reused containers outlive this process on purpose.
        std::mem::forget(pg);
        std::mem::forget(rabbit);
        Infra {
            database_url: format!("postgres://postgres:postgres@127.0.0.1:{pg_port}/postgres"),
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"),
            source: "testcontainers",
        }
    }
}
