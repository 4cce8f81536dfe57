//! A webhook receiver for notification tests, switchable between up and
//! down, counting what it gets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

#[derive(Default)]
struct State {
    up: AtomicBool,
    /// Milliseconds each accepted call takes to answer.
    delay_ms: AtomicU64,
    refused: AtomicUsize,
    accepted: Mutex<HashMap<String, u32>>,
    traceparents: Mutex<Vec<String>>,
}

/// See the module docs.
pub struct WebhookSink {
    pub url: String,
    state: Arc<State>,
    handle: actix_web::dev::ServerHandle,
}

async fn receive(req: HttpRequest, state: web::Data<State>) -> HttpResponse {
    if !state.up.load(Ordering::SeqCst) {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::ServiceUnavailable().finish();
    }
    let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if let Some(tp) = req.headers().get("traceparent").and_then(|v| v.to_str().ok()) {
        state.traceparents.lock().unwrap().push(tp.to_owned());
    }
    *state.accepted.lock().unwrap().entry(key).or_default() += 1;
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        // A slow receiver: it has the notification, the caller waits.
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    HttpResponse::NoContent().finish()
}

impl WebhookSink {
    /// Starts the receiver, up or down.
    pub async fn start(up: bool) -> Self {
        let state = Arc::new(State::default());
        state.up.store(up, Ordering::SeqCst);
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || App::new().app_data(data.clone()).route("/hook", web::post().to(receive)))
            .workers(1)
            .disable_signals()
            .bind("127.0.0.1:0")
            .unwrap();
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { url: format!("http://127.0.0.1:{port}/hook"), state, handle }
    }

    /// Makes every accepted call take `delay` to answer.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_up(&self, up: bool) {
        self.state.up.store(up, Ordering::SeqCst);
    }

    /// Calls answered 503 while down.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// `traceparent` headers of accepted deliveries.
    pub fn traceparents(&self) -> Vec<String> {
        self.state.traceparents.lock().unwrap().clone()
    }

    /// Accepted deliveries per idempotency key.
    pub fn accepted(&self) -> HashMap<String, u32> {
        self.state.accepted.lock().unwrap().clone()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        tokio::spawn(async move { handle.stop(false).await });
    }
}
