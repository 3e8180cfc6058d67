//! `bare-proxy`: the yardstick of `bench/run`. A Pingora passthrough that does nothing but forward every
//! request to one upstream over plain HTTP/1.1 with keep-alive: no auth, no body inspection, no metering,
//! no metrics. Same Pingora version (same Cargo.lock) and thread count as the gateway, so the difference
//! between the two is what token-exchange itself costs.
//!
//!   cargo run --release --example bare-proxy -- --listen 127.0.0.1:7000 --upstream 127.0.0.1:9000 --threads 2

use std::net::SocketAddr;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::{HttpPeer, ProxyHttp, Result, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};

#[derive(Parser)]
#[command(about = "Minimal Pingora passthrough proxy (benchmark baseline)")]
struct Args {
    #[arg(long)]
    listen: String,
    /// The upstream's address (resolved once: no DNS on the request path, as in the gateway).
    #[arg(long)]
    upstream: SocketAddr,
    /// Pingora worker threads: the gateway's `gateway.threads`.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Passthrough {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    // Pingora's own log (connection errors, shutdown) on stderr, as the gateway has it; TOKEX_LOG filters.
    token_exchange::telemetry::init_logging();
    let args = Args::parse();
    // SIGTERM: stop within about a second (the gateway's benchmark config uses the same grace period).
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Passthrough { upstream: args.upstream },
        "bare-proxy",
    );
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);
    server.run(RunArgs::default());
}
