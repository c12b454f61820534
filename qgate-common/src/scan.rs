//! The plain-read proof both kernel programs run (tc gate and server hook),
//! as a byte-at-a-time state machine: here so that the agent's tests run
//! the very code the kernel runs against the classifier (`harmless_text`).
//!
//! True only for the text of one `SELECT` or `SHOW` statement with no `;`
//! other than a final one followed by blanks only, no parenthesis (so no
//! function call, subquery or VALUES list), no `INTO`/`FOR` word and no
//! join (no `JOIN` word, no comma in its FROM list: whether a join is
//! filtered is the agent's to read), after leading whitespace and
//! comments. Nested block comments are refused rather than followed.
//!
//! For MySQL/MariaDB ([`Scan::mysql`]) also refused: a leading block
//! comment (MariaDB runs `/*! … */`: `/*!INSERT INTO t2*/ SELECT …` is an
//! INSERT), a NUL byte (a MySQL text has no terminator: what follows one is
//! the server's to read), any byte above 0x7F (the session's character set
//! is not known here), and the word `LOCK` (`LOCK IN SHARE MODE` takes row
//! locks).

/// Lower-case ASCII letters packed big-endian, for keyword comparison.
const KW_SELECT: u64 = 0x73656c656374; // "select"
const KW_SHOW: u64 = 0x73686f77; // "show"
const W_INTO: u64 = 0x696e746f; // "into": SELECT INTO creates a table
const W_FOR: u64 = 0x666f72; // "for": FOR UPDATE/SHARE take row locks
const W_JOIN: u64 = 0x6a6f696e; // "join"
const W_FROM: u64 = 0x66726f6d; // "from": a comma after it joins tables
const W_LOCK: u64 = 0x6c6f636b; // "lock": MySQL's LOCK IN SHARE MODE
/// Words that end a FROM list (a comma after them is not a join).
const ENDS_FROM: [u64; 11] = [
    0x7768657265,   // where
    0x67726f7570,   // group
    0x6f72646572,   // order
    0x6c696d6974,   // limit
    0x6f6666736574, // offset
    0x686176696e67, // having
    0x77696e646f77, // window
    0x6665746368,   // fetch
    0x756e696f6e,   // union
    0x657863657074, // except
    0x696e746f,     // into (refused anyway)
];

/// Scanner states.
const LEADING: u8 = 0;
const LINE_COMMENT: u8 = 1;
const BLOCK_COMMENT: u8 = 2;
const KEYWORD: u8 = 3;
const BODY: u8 = 4;
/// After the statement's one `;`: only whitespace may follow.
const TRAILING: u8 = 5;

#[inline(always)]
fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The scanner's state between characters. `bpf_loop` calls [`scan_step`]
/// once per character, so the verifier checks the step once instead of
/// walking 512 unrolled iterations.
#[repr(C)]
pub struct Scan {
    pub word: u64,
    pub n: u32,
    pub word_len: u32,
    pub state: u8,
    pub prev: u8,
    pub skip_name: u8,
    pub refused: u8,
    /// 1 between the word FROM and the next clause word.
    pub in_from: u8,
    /// 1: the text is MySQL's (see the module's note).
    pub mysql: u8,
    /// 1 while the current word began with a digit.
    pub digit_word: u8,
    pub _pad: [u8; 1],
}

impl Scan {
    /// A fresh scanner; `is_parse`: the text starts with a Parse message's
    /// statement name (skipped up to its NUL).
    pub const fn new(n: u32, is_parse: bool) -> Scan {
        Scan {
            word: 0,
            n,
            word_len: 0,
            state: LEADING,
            prev: 0,
            skip_name: is_parse as u8,
            refused: 0,
            in_from: 0,
            mysql: 0,
            digit_word: 0,
            _pad: [0; 1],
        }
    }

    /// A fresh scanner for a MySQL `COM_QUERY` text.
    pub const fn mysql(n: u32) -> Scan {
        let mut scan = Scan::new(n, false);
        scan.mysql = 1;
        scan
    }
}

impl Scan {
    fn ends_word_badly(&self) -> bool {
        (self.word_len == 4
            && (self.word == W_INTO
                || self.word == W_JOIN
                || (self.mysql != 0 && self.word == W_LOCK)))
            || (self.word_len == 3 && self.word == W_FOR)
    }

    /// A word of the body ended: FROM starts a table list, a clause word
    /// ends it.
    fn word_ended(&mut self) {
        if self.word_len == 4 && self.word == W_FROM {
            self.in_from = 1;
        } else if (5..=6).contains(&self.word_len) || self.word_len == 4 {
            let mut i = 0;
            while i < ENDS_FROM.len() {
                if self.word == ENDS_FROM[i] {
                    self.in_from = 0;
                }
                i += 1;
            }
        }
    }

    /// Feeds one character; `false` ends the scan (refused or end of text).
    #[inline(always)]
    pub fn step(&mut self, c: u8) -> bool {
        if self.skip_name != 0 {
            if c == 0 {
                self.skip_name = 0;
            }
            return true;
        }
        if self.mysql != 0 && (c == 0 || c >= 0x80) {
            return self.refuse();
        }
        if c == 0 {
            return false;
        }
        match self.state {
            LEADING => {
                if self.prev == b'-' || self.prev == b'/' {
                    // The second character of a comment opener, or a stray operator.
                    if self.prev == b'-' && c == b'-' {
                        self.state = LINE_COMMENT;
                    } else if self.prev == b'/' && c == b'*' && self.mysql == 0 {
                        self.state = BLOCK_COMMENT;
                    } else {
                        return self.refuse();
                    }
                    self.prev = 0;
                    return true;
                }
                if c.is_ascii_alphabetic() {
                    self.state = KEYWORD;
                    self.word = c.to_ascii_lowercase() as u64;
                    self.word_len = 1;
                } else if !(c.is_ascii_whitespace() || c == b'-' || c == b'/') {
                    return self.refuse();
                }
            }
            LINE_COMMENT => {
                // The lexer ends `--` comments at either newline character.
                if c == b'\n' || c == b'\r' {
                    self.state = LEADING;
                }
            }
            BLOCK_COMMENT => {
                if c == b'*' && self.prev == b'/' {
                    return self.refuse();
                }
                if c == b'/' && self.prev == b'*' {
                    self.state = LEADING;
                    // This '/' must not start another comment.
                    self.prev = 0;
                    return true;
                }
            }
            KEYWORD => {
                if is_ident(c) {
                    if !c.is_ascii_alphabetic() || self.word_len >= 6 {
                        return self.refuse();
                    }
                    self.word = (self.word << 8) | c.to_ascii_lowercase() as u64;
                    self.word_len += 1;
                } else {
                    if (self.word != KW_SELECT && self.word != KW_SHOW) || c == b';' || c == b'(' {
                        return self.refuse();
                    }
                    self.state = BODY;
                    self.word = 0;
                    self.word_len = 0;
                }
            }
            TRAILING => {
                if !c.is_ascii_whitespace() {
                    return self.refuse();
                }
            }
            _ => {
                if c == b'(' {
                    return self.refuse();
                }
                if c == b';' {
                    // A terminating semicolon: fine if nothing but blanks follows.
                    if self.ends_word_badly() {
                        return self.refuse();
                    }
                    self.state = TRAILING;
                    self.prev = c;
                    return true;
                }
                if self.mysql != 0 && self.prev == b'/' && c == b'*' {
                    // MariaDB runs `/*!…*/` (and strips its version
                    // digits, so `/*!50000INTO` reads INTO): no block
                    // comment in a MySQL body.
                    return self.refuse();
                }
                if is_ident(c) {
                    if self.word_len == 0 {
                        self.digit_word = c.is_ascii_digit() as u8;
                    } else if self.mysql != 0 && self.digit_word != 0 && c.is_ascii_alphabetic() {
                        // MySQL ends a number before letters: `1.5INTO`,
                        // `1e0FOR` read INTO and FOR.
                        return self.refuse();
                    }
                    self.word = (self.word << 8) | c.to_ascii_lowercase() as u64;
                    self.word_len += 1;
                } else {
                    if self.ends_word_badly() {
                        return self.refuse();
                    }
                    self.word_ended();
                    self.word = 0;
                    self.word_len = 0;
                    if c == b',' && self.in_from != 0 {
                        return self.refuse();
                    }
                }
            }
        }
        self.prev = c;
        true
    }

    fn refuse(&mut self) -> bool {
        self.refused = 1;
        false
    }

    /// The verdict once the text ended.
    pub fn harmless(&self) -> bool {
        self.refused == 0
            && match self.state {
                KEYWORD => self.word == KW_SELECT || self.word == KW_SHOW,
                BODY => !self.ends_word_badly(),
                TRAILING => true,
                _ => false,
            }
    }
}

/// The whole proof over `text` in one call (userspace; the kernel feeds the
/// same [`Scan::step`] from `bpf_loop`, at most 512 bytes).
pub fn harmless_text(text: &[u8], is_parse: bool) -> bool {
    scan_text(text, Scan::new(text.len() as u32, is_parse))
}

/// [`harmless_text`] for a MySQL `COM_QUERY` text.
pub fn harmless_mysql_text(text: &[u8]) -> bool {
    scan_text(text, Scan::mysql(text.len() as u32))
}

fn scan_text(text: &[u8], mut scan: Scan) -> bool {
    if text.is_empty() || text.len() > 512 {
        return false;
    }
    for &c in text {
        if !scan.step(c) {
            break;
        }
    }
    scan.harmless()
}

#[cfg(test)]
mod tests {
    use super::{harmless_mysql_text as mysql, harmless_text as pg};

    #[test]
    fn mysql_texts_refuse_what_mariadb_reads_differently() {
        for ok in [
            "SELECT * FROM t WHERE id = 1",
            "select count(*) from t",
            "SELECT v FROM t WHERE id = 2;",
            "-- note\nSELECT 1",
            "SHOW TABLES",
            "SELECT @@version_comment LIMIT 1",
        ] {
            let expected = !ok.contains('(');
            assert_eq!(mysql(ok.as_bytes()), expected, "{ok}");
        }
        for refused in [
            // MariaDB runs the inside of /*! … */: an INSERT … SELECT.
            "/*!INSERT INTO t2*/ SELECT * FROM t",
            "/* a note */ SELECT 1",
            "SELECT 1;\0DROP TABLE t",
            "SELECT * FROM t WHERE name = 'Zo\u{eb}'",
            "SELECT * FROM t LOCK IN SHARE MODE",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t INTO OUTFILE '/tmp/x'",
            "SELECT 1; DROP TABLE t",
            "SELECT * FROM t /*!,t2*/",
            "SELECT 1.5INTO OUTFILE '/tmp/q'",
            "SELECT * FROM t /*!50000INTO OUTFILE '/tmp/q'*/",
            "SELECT * FROM t WHERE id=1e0FOR UPDATE",
            "SELECT * FROM t /* a note */",
            "SELECT 5lock FROM t",
            "# c\nSELECT 1",
        ] {
            assert!(!mysql(refused.as_bytes()), "{refused}");
        }
        // PostgreSQL's reading is unchanged.
        assert!(pg(b"/* a note */ SELECT 1", false));
        assert!(pg(b"SELECT lock FROM t", false));
        assert!(!mysql(b"SELECT lock FROM t"));
    }
}
