//! What a request can get wrong, or the server: each a status that says whose fault it is
//! (4xx the client's, 5xx the server's) and a JSON body `{"error": "..."}` that says what.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An answer other than success.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is malformed: a body that does not decode, pixels out of range, ...
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than the limit.
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(usize),
    /// A body of a type the route does not take.
    #[error("{0}")]
    UnsupportedType(String),
    /// No such route.
    #[error("no such route: {0}")]
    NotFound(String),
    /// The route exists, the method does not.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The route.
        path: String,
    },
    /// The client took too long to send its request.
    #[error("the request was not received within {0} seconds")]
    Timeout(u64),
    /// Too many requests are waiting for the model.
    #[error("the server is busy: too many predictions are waiting; retry shortly")]
    Busy,
    /// The server failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::UnsupportedType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ServeError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        (
            self.status(),
            Json(serde_json::json!({"error": self.to_string()})),
        )
            .into_response()
    }
}
