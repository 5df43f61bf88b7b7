//! Chat templates: found in GGUF metadata, `chat_template.jinja` or `tokenizer_config.json`, and
//! rendered with minijinja the way transformers' `apply_chat_template` renders them (jinja2 with
//! `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`, python string methods).
//!
//! Templates come with the model, not from clients, but a hostile or broken one must not hang or
//! flood a request: each render has an instruction budget ([`RENDER_FUEL`]) and an output limit
//! ([`MAX_RENDERED_BYTES`]), and fails with a clear error past either. Values the template builds
//! are checked as they are built, so none can grow outside that budget ([`bounded`]).

mod bounded;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the model has no chat template")]
    NoTemplate,
    #[error("invalid chat template: {0}")]
    Template(String),
    #[error("chat template failed: {0}")]
    Render(String),
    #[error("unknown role `{0}` (system, user or assistant)")]
    Role(String),
}

/// Refuses a conversation with a role outside system, user and assistant: a template renders
/// whatever it is given, and an unknown role would reach the model as text it never saw.
pub fn check_roles(messages: &[ChatMessage]) -> Result<(), ChatError> {
    match messages.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant")) {
        Some(m) => Err(ChatError::Role(m.role.clone())),
        None => Ok(()),
    }
}

/// One chat message, as OpenAI's API and the templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the special-token strings templates refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat";

/// Template instructions one render may execute: real templates take tens per message, so this
/// allows conversations far beyond any context window while stopping a runaway loop in well
/// under a second.
pub const RENDER_FUEL: u64 = 5_000_000;
/// Largest rendered prompt: far beyond any context window in tokens.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// An output sink that refuses to grow past [`MAX_RENDERED_BYTES`].
struct BoundedOutput(Vec<u8>);

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        Self::compile(source, bos_token, eos_token, true)
    }

    /// `check_built_values: false` leaves out the checks of [`bounded`], for tests that compare
    /// the checked template's output with minijinja's own.
    fn compile(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        check_built_values: bool,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(e.to_string()))?;
        env.set_syntax(syntax.clone());
        env.set_fuel(Some(RENDER_FUEL));
        // Python string methods (`.strip()`, `.startswith()`...) that HF templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
        env.add_function(bounded::CHECK_FUNCTION, bounded::check_built_value);
        env.add_function(bounded::ASSIGN_FUNCTION, bounded::check_assigned_value);
        // Only the checked template is compiled: compiling the template as written could fold a
        // constant such as `(n * [x]) ~ ''` into a string of any size. Syntax errors still name the
        // template as written, since that is what `wrap_builders` parses.
        let checked = if check_built_values {
            bounded::wrap_builders(source, syntax).map_err(|e| ChatError::Template(e.to_string()))?
        } else {
            None
        };
        env.add_template_owned(TEMPLATE_NAME, checked.unwrap_or_else(|| source.to_string()))
            .map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders `messages` with `add_generation_prompt=True`.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ChatError> {
        self.render_with(messages, true)
    }

    /// Renders `messages`; `add_generation_prompt` as transformers' `apply_chat_template` takes
    /// it (false for a finished conversation, as training renders one).
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        check_roles(messages)?;
        let template =
            self.env.get_template(TEMPLATE_NAME).map_err(|e| ChatError::Template(e.to_string()))?;
        let mut out = BoundedOutput(Vec::new());
        let rendered = template.render_captured_to(
            minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            },
            &mut out,
        );
        match rendered {
            Ok(_) => {
                String::from_utf8(out.0).map_err(|_| ChatError::Render("the output is not UTF-8".into()))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(ChatError::Render(format!(
                "the template ran past its budget of {RENDER_FUEL} instructions"
            ))),
            Err(e) if e.kind() == ErrorKind::WriteFailure => {
                Err(ChatError::Render(format!("the rendered prompt would exceed {MAX_RENDERED_BYTES} bytes")))
            }
            Err(e) => Err(ChatError::Render(e.to_string())),
        }
    }

    /// The template of a Hugging Face model directory: `chat_template.jinja`, else the
    /// `chat_template` field of `tokenizer_config.json` (a string, or a list with a `default`).
    pub fn source_from_dir(dir: &Path) -> Result<Option<String>, ChatError> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return std::fs::read_to_string(&jinja).map(Some).map_err(|e| ChatError::Template(e.to_string()));
        }
        let Some(config) = read_tokenizer_config(dir)? else { return Ok(None) };
        Ok(match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        })
    }
}

/// `tokenizer_config.json` of a model directory, if present.
pub fn read_tokenizer_config(dir: &Path) -> Result<Option<serde_json::Value>, ChatError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ChatError::Template(e.to_string()))?;
    serde_json::from_str(&text).map(Some).map_err(|e| ChatError::Template(format!("{}: {e}", path.display())))
}

/// A special-token string from `tokenizer_config.json` (`"<s>"` or `{"content": "<s>"}`).
pub fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The subset of `strftime` that chat templates use for "today's date" (`%d %b %Y` and friends),
/// in UTC.
fn strftime_now(fmt: &str) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    fmt.replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", name)
        .replace("%b", &name[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn trims_blocks_like_transformers() {
        // Expected output is jinja2's with trim_blocks and lstrip_blocks (as transformers sets).
        let src =
            "{% for m in messages %}\n  {% if true %}{{ m.content.strip() }}|\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[msg("user", " a "), msg("user", "b")]).unwrap(), "a|\nb|\n");
        let t =
            ChatTemplate::new("{% for m in messages %}\n  {{ m.content }}|\n{% endfor %}", "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "a"), msg("user", "b")]).unwrap(), "  a|\n  b|\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let err = t.render(&[msg("system", "x")]).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }

    #[test]
    fn runaway_templates_stop_with_a_clear_error() {
        let spin = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = spin.render(&[msg("user", "hi")]).unwrap_err().to_string();
        assert!(err.contains("budget"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "the budget must stop it");

        let flood =
            ChatTemplate::new("{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}", "", "").unwrap();
        let err = flood.render(&[msg("user", "hi")]).unwrap_err().to_string();
        assert!(err.contains("exceed"), "{err}");

        // Repeated lists are lazy: printing or scanning one of billions of items stops too.
        for huge in ["{{ 77777777777 * ['content'] }}", "{{ 'x' in 77777777777 * ['content'] }}"] {
            let t = ChatTemplate::new(huge, "", "").unwrap();
            let started = std::time::Instant::now();
            assert!(t.render(&[msg("user", "hi")]).is_err(), "{huge}");
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "{huge}: {:?}", started.elapsed());
        }

        // A long but ordinary conversation stays well within both limits.
        let plain =
            ChatTemplate::new("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}", "", "")
                .unwrap();
        let many: Vec<ChatMessage> = (0..5000).map(|i| msg("user", &format!("message {i}"))).collect();
        assert!(plain.render(&many).unwrap().contains("message 4999"));
    }

    #[test]
    fn values_built_past_the_limit_stop_the_render() {
        let doubling = |step: &str| {
            format!(
                "{{% set ns = namespace(a=['xy']) %}}{{% for i in range(60) %}}{{% set ns.a = {step} %}}\
                 {{% endfor %}}{{{{ ns.a ~ '' }}}}"
            )
        };
        let hostile = [
            "{{ 77777777 * ['content'] }}".to_string(),
            "{{ (77777777 * ['content']) ~ '' }}".into(),
            "{{ (77777777 * ['content']) == (77777777 * ['content']) }}".into(),
            "{{ (77777777 * ['content']) | lower }}".into(),
            "{{ ['x'] in 77777777 * ['content'] }}".into(),
            "{{ 99999999 * 'x' }}".into(),
            doubling("ns.a + ns.a"),
            doubling("[ns.a, ns.a]"),
            doubling("(ns.a, ns.a)"),
            doubling("ns.a, ns.a"),
            doubling("{'k': ns.a, 'v': ns.a}"),
            doubling("dict(k=ns.a, v=ns.a)"),
            doubling("ns.a * 2"),
            doubling("ns.a ~ ns.a"),
            // Deep nesting, and a namespace holding itself: printing either would overflow the stack.
            "{% set ns = namespace(a=[]) %}{% for i in range(100000) %}{% set ns.a = [ns.a] %}{% endfor %}{{ ns.a }}"
                .into(),
            "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}".into(),
            "{% set ns = namespace() %}{% set ns.me = [1, {'k': ns}] %}{{ ns ~ '' }}".into(),
            "{% set ns = namespace() %}{% set ns.me, x = ns, 0 %}{{ ns }}".into(),
            "{% set ns = namespace() %}{% set (x, ns.me) = (0, ns) %}{{ ns }}".into(),
            "{% set ns = namespace() %}{% with a = 1 %}{% set ns.me = ns %}{% endwith %}{{ ns }}".into(),
            // Filters build values too: `batch` with a fill value repeats it.
            format!("{{% set a = ['x'] %}}{}{{{{ a ~ '' }}}}", "{% set a = a|batch(2, a) %}".repeat(60)),
            "{% macro f(a, n) %}{% if n %}{{ f(a|batch(2, a), n - 1) }}{% else %}{{ a ~ '' }}{% endif %}{% endmacro %}{{ f(['x'], 60) }}"
                .into(),
        ];
        for source in &hostile {
            // Compiling counts too: minijinja folds constant expressions when it compiles.
            let started = std::time::Instant::now();
            let t = ChatTemplate::new(source, "", "").unwrap();
            let err = t.render(&[msg("user", "hi")]).unwrap_err().to_string();
            assert!(
                err.contains("limit") || err.contains("budget") || err.contains("namespace"),
                "{source}: {err}"
            );
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{source}: {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn inputs_that_once_hung_or_crashed_the_fuzzer_render_within_the_budget() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/chat_template");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("regress_")) {
                continue;
            }
            // The fuzz target's layout: the template, then NUL-separated message contents.
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            let mut parts = text.split('\0');
            let source = parts.next().unwrap_or_default();
            let messages: Vec<ChatMessage> = parts.map(|content| msg("user", content)).collect();
            let started = std::time::Instant::now();
            if let Ok(template) = ChatTemplate::new(source, "<s>", "</s>") {
                let _ = template.render(&messages);
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "{}", path.display());
            replayed += 1;
        }
        assert!(replayed >= 3, "the regression inputs are in {}", dir.display());
    }

    #[test]
    fn checking_built_values_changes_no_output() {
        let sources = [
            include_str!("../../../fuzz/seeds/chat_template/chatml"),
            include_str!("../../../fuzz/seeds/chat_template/llama"),
            "{{ 1 + 2 * 3 }} {{ -2 * 3 }} {{ 2 ** 3 * 2 }} {{ (1 + 2) * 3 }} {{ 7 // 2 * 2 }} {{ 1.5 * 2 }}",
            "{{ 'ab' * 3 }}|{{ 3 * 'ab' }}|{{ [1, 2] * 2 }}|{{ [1] + [2] }}|{{ (1, 2) }}|{{ () }}|{{ (1,) }}",
            "{{ 'x' ~ 1 ~ none ~ [1, 'a'] }}|{{ {'a': [1, (2, 3)], 'b': {}} }}|{{ 'a * b' ~ \"(~)\" }}",
            "{% set a, b = 1, 2 * 3 %}{{ a }}{{ b }}{% set t = 4, 5 %}{{ t }}{% for x, y in [(1, 2), (3, 4)] %}{{ x * y }}{% endfor %}",
            "{% for x in (1, 2) %}{{ x }}{% endfor %}{% with p = [1, 2], q = {'k': 1} %}{{ p }}{{ q.k }}{% endwith %}",
            "{% macro m(a, b=[1, 2] + [3]) %}{{ a }}{{ b }}{{ caller() if caller else '' }}{% endmacro %}{{ m(1 * 2) }}{% call m('c') %}in{% endcall %}",
            "{% set ns = namespace(n=0, l=[]) %}{% for m in messages %}{% set ns.n = ns.n + m.content|length %}{% set ns.l = ns.l + [m.role ~ ':'] %}{% endfor %}{% set ns.t = ns.n, 2 %}{% set ns.c = (messages[-1]['content'] | default('', true)).strip() %}{% set ns.u = messages[-1]['role'] if 'x' in messages[-1] else [] %}{{ ns.c }}{{ ns.u }}{{ ns.n }}{{ ns.l|join(',') }}{{ ns.t }}",
            "{{ messages[0].content.upper().split('L') }}{{ range(3)|list * 2 }}{{ messages|map(attribute='role')|list + ['x'] }}",
            "{% filter upper %}{{ 'a' ~ 'b' }}{% endfilter %}{% set s %}{{ [1] * 3 }}{% endset %}{{ s }}{{ loop }}",
            "{% for m in messages %}{{ loop.cycle('a', 'b') ~ (loop.index * 10) }}{% endfor %}{{ messages|length > 1 and [1] }}",
            "{{ ('<' ~ bos_token ~ '>') * 2 }}{{ [messages[-1]['content']][0][1:] }}{{ dict(a=1)['a'] * 3 }}",
            // Keywords written against brackets, `not in` and `not(...)` first in an expression.
            "{% set ns = namespace() %}{% set ns.x = 'a' not in ['b'] %}{% set y = 'a' not in ['a'], 1 %}{{ ns.x }}{{ y }}",
            "{% for m in messages if m.role in['user','system'] %}{{ m.role ~ (1 if loop.first else[2]) }}{% endfor %}",
            "{% for x in(1, 2) %}{{ not(x) ~ 'y' }}{{ x is sameas[1] }}{{ not[] }}{{ -(x * 2) }}{% endfor %}",
            "{% set ns = namespace(a=1) %}{% set ns.a, b = [ns.a, 2] %}{% set (c, ns.d) = (3, [4] * 2) %}{{ ns.a }}{{ b }}{{ c }}{{ ns.d }}",
            "{{ messages|map(attribute='content')|join('|') }}{{ messages|selectattr('role', 'eq', 'user')|list|length }}{{ [3, 1, 2]|sort|batch(2, 0)|list }}",
            "{% set s %}{{ 'x' }}{% endset %}{% set t | upper %}{{ s }}y{% endset %}{{ s }}{{ t }}{{ messages[0]|dictsort|first }}",
        ];
        let messages =
            [msg("system", "Be brief."), msg("user", "Hello"), msg("assistant", "Hi"), msg("user", "More")];
        for source in sources {
            let plain = ChatTemplate::compile(source, "<s>", "</s>", false).expect(source);
            let checked = ChatTemplate::compile(source, "<s>", "</s>", true).expect(source);
            let syntax = minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .unwrap();
            assert!(
                bounded::wrap_builders(source, syntax).unwrap().is_some(),
                "{source} has builders to check"
            );
            for generation_prompt in [true, false] {
                assert_eq!(
                    checked.render_with(&messages, generation_prompt).unwrap(),
                    plain.render_with(&messages, generation_prompt).unwrap(),
                    "{source}"
                );
            }
        }
    }

    #[test]
    fn a_template_cannot_take_the_name_of_a_check() {
        for source in [
            "{% macro __lorahost_bounded(x) %}{% endmacro %}{{ 77777777 * ['x'] }}",
            "{% set __lorahost_assignable = none %}",
        ] {
            let err = ChatTemplate::new(source, "", "").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("reserved"), "{source}: {err}");
        }
    }

    #[test]
    fn a_set_block_cannot_filter_into_a_namespace_attribute() {
        // The filters would apply outside any expression, where no check goes: this one would
        // make the namespace hold itself.
        let source = "{% set ns = namespace() %}{% set ns.x | default(ns, true) %}{% endset %}{{ ns }}";
        let err = ChatTemplate::new(source, "", "").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("cannot filter"), "{err}");
        let plain = "{% set ns = namespace() %}{% set ns.x %}a{% endset %}{% set y | upper %}b{% endset %}{{ ns.x ~ y }}";
        assert_eq!(ChatTemplate::new(plain, "", "").unwrap().render(&[]).unwrap(), "aB");
    }

    #[test]
    fn bad_template_is_reported() {
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(ChatError::Template(_))));
    }
}
