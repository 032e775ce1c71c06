//! Join tokens: HS256 JWTs minted by the application's backend (filled in by the token task).
//! TEMPORARY STUB in main, replaced by the token branch at merge.

use std::time::SystemTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    Read,
    React,
    Post,
}

impl Perm {
    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::React => "react",
            Perm::Post => "post",
        }
    }
    pub fn can_post(self) -> bool {
        self == Perm::Post
    }
    pub fn can_react(self) -> bool {
        self != Perm::Read
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub name: Option<String>,
    pub room: String,
    pub perm: Perm,
    pub exp: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    WrongRoom,
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::Malformed => 401,
            Rejection::WrongRoom => 403,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::WrongRoom => "wrong_room",
        }
    }
}

pub fn verify(
    _token: &str,
    _secrets: &[&[u8]],
    _room: &str,
    _now: SystemTime,
) -> Result<Claims, Rejection> {
    Err(Rejection::Malformed)
}

pub fn mint(_secret: &[u8], _claims: &serde_json::Value) -> String {
    String::new()
}
