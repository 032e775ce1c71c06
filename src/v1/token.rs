//! Join tokens: HS256 JWTs minted by the application's backend (filled in by the token task).
