//! Size limits on the values a chat template builds. minijinja's fuel pays for instructions and
//! output, but some values grow outside it: `n * [x]` is a lazy list of up to 100 million items,
//! `a + a` and `[a, a]` in a loop double a list or its nesting each pass, and printing or `~` of
//! such a value walks all of it. A few bytes of template could hang a render or exhaust memory.
//!
//! So before a template is compiled, every expression that can build a larger value (a list, tuple
//! or map literal, a call, `*`, `+`, `~`) is wrapped in a call to [`CHECK_FUNCTION`], which
//! passes the value on unchanged if its printed form fits in [`MAX_BUILT_BYTES`] and its nesting
//! in [`MAX_BUILT_DEPTH`], and fails the render otherwise. A value assigned to a namespace
//! attribute is checked the same way and may not hold a namespace, so no value can contain
//! itself. Every value of a render is then input (the messages), a string that fuel already
//! bounds, or a value checked when it was built. The checks' walks are paid for in fuel.
//!
//! The rewrite uses minijinja's parser (`unstable_machinery`, so the version is pinned): the
//! tests compare rewritten templates' output with minijinja's own.

use minijinja::machinery::ast::{CallArg, Expr, Stmt};
use minijinja::machinery::Token;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Value, ValueIter, ValueKind};
use minijinja::{Error, ErrorKind, State};

/// Names of the checking functions in rewritten templates ([`check_built_value`],
/// [`check_assigned_value`]): names no template would define.
pub const CHECK_FUNCTION: &str = "__lorahost_bounded";
pub const ASSIGN_FUNCTION: &str = "__lorahost_assignable";
const RESERVED_PREFIX: &str = "__lorahost_";

/// Largest printed form of a value a template builds: the rendered prompt's own limit.
pub const MAX_BUILT_BYTES: u64 = super::MAX_RENDERED_BYTES as u64;

/// Deepest nesting of a value a template builds: far past any real template's, and shallow
/// enough that printing the value cannot overflow the stack.
pub const MAX_BUILT_DEPTH: usize = 500;

/// `source` with every value-building expression wrapped in [`CHECK_FUNCTION`], or `None` when
/// it has none. Only text is inserted, never a line break, so error positions keep their lines.
pub fn wrap_builders(source: &str, syntax: SyntaxConfig) -> Result<Option<String>, Error> {
    let ast = minijinja::machinery::parse(source, super::TEMPLATE_NAME, syntax.clone())?;
    // A template's own names shadow functions, so one naming a check could switch it off.
    if source.contains(RESERVED_PREFIX) {
        return Err(Error::new(
            ErrorKind::SyntaxError,
            format!("names starting with `{RESERVED_PREFIX}` are reserved"),
        ));
    }
    let mut nodes = Vec::new();
    visit_stmt(&ast, &mut nodes);
    if nodes.is_empty() {
        return Ok(None);
    }
    let brackets = bracket_tokens(source, syntax)?;
    for node in &mut nodes {
        node.range = balanced(node.range, &brackets).ok_or_else(|| {
            Error::new(ErrorKind::SyntaxError, "an expression's brackets do not match in the template")
        })?;
    }
    // The nodes nest or are disjoint. At one offset, closings come before openings, inner nodes
    // close first and outer nodes open first. Each node gets parentheses of its own inside the
    // call, since a tuple such as `a, b` need not have any and would otherwise become two
    // arguments.
    let openings: Vec<String> = nodes.iter().map(|node| format!("{}((", node.function)).collect();
    let mut edits: Vec<(EditOrder, &str)> = Vec::with_capacity(nodes.len() * 2);
    for (index, (node, opening)) in nodes.iter().zip(&openings).enumerate() {
        let index = index as i64;
        let Range { start, end } = node.range;
        let len = (end - start) as i64;
        edits.push(((start, true, -len, -index), opening.as_str()));
        edits.push(((end, false, len, index), "))"));
    }
    edits.sort_by_key(|&(key, _)| key);
    let mut out = String::with_capacity(source.len() + edits.len() * (CHECK_FUNCTION.len() + 2));
    let mut copied = 0;
    for ((offset, ..), text) in edits {
        let Some(chunk) = source.get(copied..offset) else {
            return Err(Error::new(
                ErrorKind::SyntaxError,
                "an expression's offsets are outside the template",
            ));
        };
        out.push_str(chunk);
        out.push_str(text);
        copied = offset;
    }
    out.push_str(&source[copied..]);
    Ok(Some(out))
}

/// Where an inserted text goes, in sorting order: its offset, whether it opens a node (closings
/// first), then for openings the longer node first and for closings the shorter, then (for nodes
/// of one range) parents open before and close after their children, which are found first.
type EditOrder = (usize, bool, i64, i64);

/// What rewritten templates call around a value they build: `value` itself, if it fits.
pub fn check_built_value(state: &State, value: Value) -> Result<Value, Error> {
    check(state, value, false)
}

/// What rewritten templates call around a value assigned to a namespace attribute (`{% set ns.x
/// = value %}`): `value` itself, if it fits and holds no namespace. Namespaces are the only values
/// a template can change, so with none inside another no value can contain itself (printing or
/// comparing one that did would recurse without end).
pub fn check_assigned_value(state: &State, value: Value) -> Result<Value, Error> {
    check(state, value, true)
}

fn check(state: &State, value: Value, refuse_namespaces: bool) -> Result<Value, Error> {
    // The walk is work done for the template, so it is paid for like the template's own, and it
    // goes no further than the remaining fuel pays for.
    let affordable = state.fuel_levels().map_or(u64::MAX, |(_, remaining)| remaining / FUEL_PER_VISIT);
    let visited = match walk(&value, MAX_BUILT_BYTES, affordable, refuse_namespaces) {
        Ok(visited) => visited,
        // More than the fuel left: paying for it fails the render with the budget's own error.
        Err(Refused::OutOfFuel) => affordable.saturating_add(1),
        Err(Refused::TooLarge) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "the template built a value past the limits of {MAX_BUILT_BYTES} printed bytes \
                     and {MAX_BUILT_DEPTH} levels of nesting"
                ),
            ))
        }
        Err(Refused::Namespace) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "a namespace attribute cannot hold a namespace",
            ))
        }
    };
    state.consume_fuel(visited.saturating_mul(FUEL_PER_VISIT))?;
    Ok(value)
}

/// Fuel one value visited by a check costs: enough that the checks of one render visit at most a
/// million values.
const FUEL_PER_VISIT: u64 = super::RENDER_FUEL / 1_000_000;

/// Smallest printed size of a list item (one byte and `, `) and of a map entry (a byte each for
/// key and value, `: ` and `, `).
const ITEM_MIN: u64 = 3;
const MAP_ENTRY_MIN: u64 = 6;

/// Why [`walk`] refused a value.
enum Refused {
    TooLarge,
    Namespace,
    OutOfFuel,
}

fn is_namespace(value: &Value) -> bool {
    value.as_object().is_some_and(|object| object.type_name().ends_with("::Namespace"))
}

/// Walks `value` and returns how many values it visited, or why it refused the value as soon as
/// its printed size reaches past `limit`, its nesting past [`MAX_BUILT_DEPTH`], its visits past
/// `max_visits`, or (if asked) it meets a namespace.
///
/// A container of known length is counted at its smallest printed size (one byte per item, and
/// the separators) before any item is visited, so a huge lazy list is refused at once; each item
/// then adds what it prints beyond its one byte. Every visited value adds at least one byte, so
/// the walk ends within `limit` steps whatever the value is.
fn walk(value: &Value, limit: u64, max_visits: u64, refuse_namespaces: bool) -> Result<u64, Refused> {
    let mut size = 1u64;
    let mut visited = 0u64;
    // The containers being walked, innermost last (with the map itself, to look up the value of
    // each key), and a map value still to visit after its key.
    let mut open: Vec<(Option<Value>, ValueIter, bool)> = Vec::new();
    let mut map_value = None;
    let mut next = Some(value.clone());
    loop {
        if let Some(value) = next.take() {
            visited += 1;
            if visited > max_visits {
                return Err(Refused::OutOfFuel);
            }
            size += match value.kind() {
                ValueKind::String | ValueKind::Bytes => value.as_bytes().map_or(0, |b| b.len() as u64) + 1,
                kind @ (ValueKind::Seq | ValueKind::Iterable | ValueKind::Map) => {
                    if refuse_namespaces && is_namespace(&value) {
                        return Err(Refused::Namespace);
                    }
                    let per_item = if kind == ValueKind::Map { MAP_ENTRY_MIN } else { ITEM_MIN };
                    let known = value.len().map(|len| len as u64);
                    if let Ok(items) = value.try_iter() {
                        let map = (kind == ValueKind::Map).then(|| value.clone());
                        open.push((map, items, known.is_none()));
                        if open.len() > MAX_BUILT_DEPTH {
                            return Err(Refused::TooLarge);
                        }
                    }
                    1 + known.map_or(0, |len| len.saturating_mul(per_item))
                }
                _ => 0,
            };
            if size > limit {
                return Err(Refused::TooLarge);
            }
        }
        if let Some(value) = map_value.take() {
            next = Some(value);
            continue;
        }
        let Some((map, items, unsized_container)) = open.last_mut() else { return Ok(visited) };
        match items.next() {
            Some(item) => {
                if *unsized_container {
                    size += 3;
                }
                if let Some(map) = map {
                    map_value = Some(map.get_item(&item).unwrap_or_default());
                }
                next = Some(item);
            }
            None => {
                open.pop();
            }
        }
    }
}

/// The offsets of the template's bracket tokens: `+1` for `(`, `[` and `{`, `-1` for their
/// closings.
fn bracket_tokens(source: &str, syntax: SyntaxConfig) -> Result<Vec<(Range, i32)>, Error> {
    let mut brackets = Vec::new();
    for token in minijinja::machinery::tokenize(source, false, syntax) {
        let (token, span) = token?;
        let depth = match token {
            Token::ParenOpen | Token::BracketOpen | Token::BraceOpen => 1,
            Token::ParenClose | Token::BracketClose | Token::BraceClose => -1,
            _ => continue,
        };
        brackets.push((Range { start: span.start_offset as usize, end: span.end_offset as usize }, depth));
    }
    Ok(brackets)
}

/// `range` grown to take in the brackets it closes or opens but does not contain: the parentheses
/// around a node's first or last operand, which no node's span includes.
fn balanced(mut range: Range, brackets: &[(Range, i32)]) -> Option<Range> {
    let first = brackets.partition_point(|(b, _)| b.start < range.start);
    let after = brackets.partition_point(|(b, _)| b.start < range.end);
    let (mut depth, mut lowest) = (0, 0);
    for &(_, d) in &brackets[first..after] {
        depth += d;
        lowest = lowest.min(depth);
    }
    let (mut unopened, mut unclosed) = (-lowest, depth - lowest);
    let mut nested = 0;
    for &(b, d) in brackets[..first].iter().rev() {
        if unopened == 0 {
            break;
        }
        if d < 0 {
            nested += 1;
        } else if nested > 0 {
            nested -= 1;
        } else {
            unopened -= 1;
            range.start = b.start;
        }
    }
    nested = 0;
    for &(b, d) in &brackets[after..] {
        if unclosed == 0 {
            break;
        }
        if d > 0 {
            nested += 1;
        } else if nested > 0 {
            nested -= 1;
        } else {
            unclosed -= 1;
            range.end = b.end;
        }
    }
    (unopened == 0 && unclosed == 0).then_some(range)
}

/// An expression that can build a larger value, found in the template.
struct Builder {
    range: Range,
    /// The checking function: [`CHECK_FUNCTION`] or [`ASSIGN_FUNCTION`].
    function: &'static str,
}

fn visit_stmt(stmt: &Stmt<'_>, nodes: &mut Vec<Builder>) {
    match stmt {
        Stmt::Template(t) => visit_body(&t.children, nodes),
        Stmt::EmitExpr(e) => {
            visit_expr(&e.expr, nodes);
        }
        Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
        // Loop and assignment targets are names, not values: they stay as written.
        Stmt::ForLoop(f) => {
            visit_expr(&f.iter, nodes);
            if let Some(filter) = &f.filter_expr {
                visit_expr(filter, nodes);
            }
            visit_body(&f.body, nodes);
            visit_body(&f.else_body, nodes);
        }
        Stmt::IfCond(i) => {
            visit_expr(&i.expr, nodes);
            visit_body(&i.true_body, nodes);
            visit_body(&i.false_body, nodes);
        }
        Stmt::WithBlock(w) => {
            for (_target, value) in &w.assignments {
                visit_expr(value, nodes);
            }
            visit_body(&w.body, nodes);
        }
        Stmt::Set(s) => {
            let range = visit_expr(&s.expr, nodes);
            if matches!(s.target, Expr::GetAttr(_)) {
                nodes.push(Builder { range, function: ASSIGN_FUNCTION });
            }
        }
        Stmt::SetBlock(s) => {
            if let Some(filter) = &s.filter {
                visit_expr(filter, nodes);
            }
            visit_body(&s.body, nodes);
        }
        Stmt::AutoEscape(a) => {
            visit_expr(&a.enabled, nodes);
            visit_body(&a.body, nodes);
        }
        Stmt::FilterBlock(f) => {
            visit_expr(&f.filter, nodes);
            visit_body(&f.body, nodes);
        }
        Stmt::Block(b) => visit_body(&b.body, nodes),
        Stmt::Import(i) => {
            visit_expr(&i.expr, nodes);
        }
        Stmt::FromImport(i) => {
            visit_expr(&i.expr, nodes);
        }
        Stmt::Extends(e) => {
            visit_expr(&e.name, nodes);
        }
        Stmt::Include(i) => {
            visit_expr(&i.name, nodes);
        }
        Stmt::Macro(m) => {
            visit_exprs(&m.defaults, nodes);
            visit_body(&m.body, nodes);
        }
        // `{% call %}` and `{% do %}` take a call as syntax: its arguments are checked, the call's
        // result (the block's output, or nothing) is not a value the template keeps.
        Stmt::CallBlock(c) => {
            visit_expr(&c.call.expr, nodes);
            visit_args(&c.call.args, nodes);
            visit_exprs(&c.macro_decl.defaults, nodes);
            visit_body(&c.macro_decl.body, nodes);
        }
        Stmt::Do(d) => {
            visit_expr(&d.call.expr, nodes);
            visit_args(&d.call.args, nodes);
        }
    }
}

fn visit_body(body: &[Stmt<'_>], nodes: &mut Vec<Builder>) {
    for stmt in body {
        visit_stmt(stmt, nodes);
    }
}

fn visit_exprs(exprs: &[Expr<'_>], nodes: &mut Vec<Builder>) -> Option<Range> {
    exprs.iter().fold(None, |range, expr| cover_all(range, Some(visit_expr(expr, nodes))))
}

fn visit_args(args: &[CallArg<'_>], nodes: &mut Vec<Builder>) -> Option<Range> {
    args.iter().fold(None, |range, arg| match arg {
        CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => {
            cover_all(range, Some(visit_expr(e, nodes)))
        }
    })
}

/// The byte range an expression covers in the template, and appends the builders in it.
fn visit_expr(expr: &Expr<'_>, nodes: &mut Vec<Builder>) -> Range {
    use minijinja::machinery::ast::BinOpKind;
    let (span, builds, range) = match expr {
        Expr::Var(v) => (v.span(), false, None),
        Expr::Const(c) => (c.span(), false, None),
        Expr::Slice(s) => {
            let mut range = visit_expr(&s.expr, nodes);
            for part in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                range = range.cover(visit_expr(part, nodes));
            }
            (s.span(), false, Some(range))
        }
        Expr::UnaryOp(u) => (u.span(), false, Some(visit_expr(&u.expr, nodes))),
        Expr::BinOp(b) => {
            let grows = matches!(b.op, BinOpKind::Mul | BinOpKind::Add | BinOpKind::Concat);
            let range = visit_expr(&b.left, nodes).cover(visit_expr(&b.right, nodes));
            (b.span(), grows, Some(range))
        }
        Expr::Compare(c) => {
            let mut range = visit_expr(&c.expr, nodes);
            for op in &c.ops {
                range = range.cover(visit_expr(&op.expr, nodes));
            }
            (c.span(), false, Some(range))
        }
        Expr::IfExpr(i) => {
            let mut range = visit_expr(&i.test_expr, nodes).cover(visit_expr(&i.true_expr, nodes));
            if let Some(e) = &i.false_expr {
                range = range.cover(visit_expr(e, nodes));
            }
            (i.span(), false, Some(range))
        }
        Expr::Filter(f) => {
            let mut range = f.expr.as_ref().map(|e| visit_expr(e, nodes));
            range = cover_all(range, visit_args(&f.args, nodes));
            (f.span(), false, range)
        }
        Expr::Test(t) => {
            let range = cover_all(Some(visit_expr(&t.expr, nodes)), visit_args(&t.args, nodes));
            (t.span(), false, range)
        }
        Expr::GetAttr(g) => (g.span(), false, Some(visit_expr(&g.expr, nodes))),
        Expr::GetItem(g) => {
            let range = visit_expr(&g.expr, nodes).cover(visit_expr(&g.subscript_expr, nodes));
            (g.span(), false, Some(range))
        }
        Expr::Call(c) => {
            let range = cover_all(Some(visit_expr(&c.expr, nodes)), visit_args(&c.args, nodes));
            (c.span(), true, range)
        }
        Expr::List(l) => (l.span(), true, visit_exprs(&l.items, nodes)),
        Expr::Tuple(t) => (t.span(), true, visit_exprs(&t.items, nodes)),
        Expr::Map(m) => {
            let range = cover_all(visit_exprs(&m.keys, nodes), visit_exprs(&m.values, nodes));
            (m.span(), true, range)
        }
    };
    let own = Range { start: span.start_offset as usize, end: span.end_offset as usize };
    // A node's own span ends at its last token, but may start before the node (a conditional's
    // at the token before it) or inside it (a call's at its arguments): only nodes that begin
    // with a token of their own (`[`, `{`, `(`, `-`, `not`, a name or a literal) are taken at
    // their own start. For the others, their first child starts them, and `balanced` adds any
    // parentheses around it.
    let starts_with_own_token = matches!(
        expr,
        Expr::Var(_) | Expr::Const(_) | Expr::List(_) | Expr::Map(_) | Expr::Tuple(_) | Expr::UnaryOp(_)
    );
    let range = match range {
        Some(children) if starts_with_own_token => children.cover(own),
        Some(children) => Range { start: children.start, end: children.end.max(own.end) },
        None => own,
    };
    if builds {
        nodes.push(Builder { range, function: CHECK_FUNCTION });
    }
    range
}

/// A byte range of the template.
#[derive(Clone, Copy)]
struct Range {
    start: usize,
    end: usize,
}

impl Range {
    fn cover(self, other: Range) -> Range {
        Range { start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

fn cover_all(a: Option<Range>, b: Option<Range>) -> Option<Range> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.cover(b)),
        (a, b) => a.or(b),
    }
}
