//! Size limits on the values a chat template builds. minijinja's fuel pays for instructions and
//! output, but some values grow outside it: `n * [x]` is a lazy list of up to 100 million items,
//! `a + a` and `[a, a]` in a loop double a list or its nesting each pass, and printing or `~` of
//! such a value walks all of it. A few bytes of template could hang a render or exhaust memory.
//!
//! So before a template is compiled, every expression that can build a larger value (a list, tuple
//! or map literal, a call, a filter, `*`, `+`, `~`) is wrapped in a call to [`CHECK_FUNCTION`], which
//! passes the value on unchanged if its printed form fits in [`MAX_BUILT_BYTES`] and its nesting
//! in [`MAX_BUILT_DEPTH`], and fails the render otherwise. A value assigned to a namespace
//! attribute is checked the same way and may not hold a namespace, so no value can contain
//! itself. Every value of a render is then input (the messages), a string that fuel already
//! bounds, or a value checked when it was built, so the operations on it (printing, `~`,
//! comparing) are bounded too. The checks' walks are paid for in fuel.
//!
//! The rewrite uses minijinja's parser (`unstable_machinery`, so the version is pinned): the
//! tests compare rewritten templates' output with minijinja's own.

use minijinja::machinery::ast::{CallArg, Expr, Stmt};
use minijinja::machinery::Token;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Value, ValueIter, ValueKind};
use minijinja::{Error, ErrorKind, State};

/// Name of [`check_built_value`] in rewritten templates.
pub const CHECK_FUNCTION: &str = "__lorahost_bounded";
/// Name of [`check_assigned_value`] in rewritten templates.
pub const ASSIGN_FUNCTION: &str = "__lorahost_assignable";
/// The checks' names start with it, and templates may not contain it.
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
            format!("`{RESERVED_PREFIX}` is reserved: the template may not contain it"),
        ));
    }
    let mut found = Found { source, builders: Vec::new(), unchecked: None };
    visit_stmt(&ast, &mut found);
    if let Some(reason) = found.unchecked {
        return Err(Error::new(ErrorKind::SyntaxError, reason));
    }
    let mut nodes = found.builders;
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
    // arguments, and a space before the call keeps it apart from a keyword written against a
    // bracket (`in[`).
    let openings: Vec<String> = nodes.iter().map(|node| format!(" {}((", node.function)).collect();
    let mut edits: Vec<(EditOrder, &str)> = Vec::with_capacity(nodes.len() * 2);
    for (index, (node, opening)) in nodes.iter().zip(&openings).enumerate() {
        let index = index as i64;
        let Range { start, end } = node.range;
        let len = (end - start) as i64;
        edits.push(((start, true, -len, -index), opening.as_str()));
        edits.push(((end, false, len, index), "))"));
    }
    edits.sort_by_key(|&(key, _)| key);
    let mut out = String::with_capacity(source.len() + edits.len() * (CHECK_FUNCTION.len() + 3));
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
/// a template can change, and none can be assigned into one, so no value can contain itself (printing
/// or comparing one that did would recurse without end).
pub fn check_assigned_value(state: &State, value: Value) -> Result<Value, Error> {
    check(state, value, true)
}

fn check(state: &State, value: Value, refuse_namespaces: bool) -> Result<Value, Error> {
    // The walk is work done for the template, so it is paid for like the template's own, and it
    // goes no further than the remaining fuel pays for.
    let affordable = state.fuel_levels().map_or(u64::MAX, |(_, remaining)| remaining / FUEL_PER_VISIT);
    match walk(&value, MAX_BUILT_BYTES, affordable, refuse_namespaces) {
        Ok(visited) => state.consume_fuel(visited * FUEL_PER_VISIT).map(|()| value),
        Err(Refused::OutOfFuel) => Err(Error::from(ErrorKind::OutOfFuel)),
        Err(Refused::TooLarge) => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the template built a value past the limits of {MAX_BUILT_BYTES} printed bytes and \
                 {MAX_BUILT_DEPTH} levels of nesting"
            ),
        )),
        Err(Refused::Namespace) => Err(Error::new(
            ErrorKind::InvalidOperation,
            "a value assigned to a namespace attribute cannot hold a namespace",
        )),
    }
}

/// Fuel one value visited by a check costs: three instructions' worth, so the checks of one render
/// visit at most about 1.7 million values (well under a second in a release build).
const FUEL_PER_VISIT: u64 = 3;

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
/// Sizes are estimates from below: a container of known length is counted at its smallest printed
/// size (one byte per item, and the separators) before any item is visited, so a huge lazy list
/// is refused at once, and each item then adds what it prints beyond that byte (a string its
/// length and quotes, as if nothing in it were escaped). Every item adds at least a byte when it
/// is counted, so the walk ends within `limit` visits whatever the value is.
fn walk(value: &Value, limit: u64, max_visits: u64, refuse_namespaces: bool) -> Result<u64, Refused> {
    let mut size = 1u64;
    let mut visited = 0u64;
    let mut open: Vec<OpenContainer> = Vec::new();
    // A map's value, visited right after its key.
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
                    let item_min = if kind == ValueKind::Map { MAP_ENTRY_MIN } else { ITEM_MIN };
                    let len = value.len().map(|len| len as u64);
                    if let Ok(items) = value.try_iter() {
                        let map = (kind == ValueKind::Map).then(|| value.clone());
                        open.push(OpenContainer { map, items, item_min, counted: len.is_some() });
                        if open.len() > MAX_BUILT_DEPTH {
                            return Err(Refused::TooLarge);
                        }
                    }
                    1 + len.map_or(0, |len| len.saturating_mul(item_min))
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
        let Some(container) = open.last_mut() else { return Ok(visited) };
        match container.items.next() {
            Some(item) => {
                if !container.counted {
                    size += container.item_min;
                }
                if let Some(map) = &container.map {
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

/// A container [`walk`] is inside of.
struct OpenContainer {
    /// The container itself if it is a map, to look up the value of each key.
    map: Option<Value>,
    items: ValueIter,
    /// Smallest printed size of one item (with its separators).
    item_min: u64,
    /// Whether its items' smallest sizes were counted up front (its length was known).
    counted: bool,
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

/// What a walk over the template finds: its builders, in the order they are found (children
/// before their parents), or a statement that cannot be checked.
struct Found<'s> {
    source: &'s str,
    builders: Vec<Builder>,
    unchecked: Option<&'static str>,
}

impl Found<'_> {
    fn push(&mut self, range: Range, function: &'static str) {
        self.builders.push(Builder { range, function });
    }

    /// Checks the value of an assignment to `target`: if any part of the target is a namespace
    /// attribute, as a value assigned to one. The expression's own check, if it has one, is
    /// strengthened instead of a second walk added.
    fn assigned(&mut self, target: &Expr<'_>, value: Range) {
        if !assigns_attribute(target) {
            return;
        }
        match self.builders.last_mut() {
            Some(last) if last.range.start == value.start && last.range.end == value.end => {
                last.function = ASSIGN_FUNCTION;
            }
            _ => self.push(value, ASSIGN_FUNCTION),
        }
    }
}

/// Whether an assignment target (`ns.x`, `a, ns.x`, `(ns.x, b)`) sets a namespace attribute.
fn assigns_attribute(target: &Expr<'_>) -> bool {
    match target {
        Expr::GetAttr(_) => true,
        Expr::List(l) => l.items.iter().any(assigns_attribute),
        Expr::Tuple(t) => t.items.iter().any(assigns_attribute),
        _ => false,
    }
}

fn visit_stmt(stmt: &Stmt<'_>, found: &mut Found<'_>) {
    match stmt {
        Stmt::Template(t) => visit_body(&t.children, found),
        Stmt::EmitExpr(e) => {
            visit_expr(&e.expr, found);
        }
        Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
        // Loop and assignment targets are names, not values: they stay as written.
        Stmt::ForLoop(f) => {
            visit_expr(&f.iter, found);
            if let Some(filter) = &f.filter_expr {
                visit_expr(filter, found);
            }
            visit_body(&f.body, found);
            visit_body(&f.else_body, found);
        }
        Stmt::IfCond(i) => {
            visit_expr(&i.expr, found);
            visit_body(&i.true_body, found);
            visit_body(&i.false_body, found);
        }
        Stmt::WithBlock(w) => {
            for (target, value) in &w.assignments {
                let range = visit_expr(value, found);
                found.assigned(target, range);
            }
            visit_body(&w.body, found);
        }
        Stmt::Set(s) => {
            let range = visit_expr(&s.expr, found);
            found.assigned(&s.target, range);
        }
        Stmt::SetBlock(s) => {
            // The filters of `{% set ns.x | f %}` apply to the block's text outside any
            // expression, where no check can go; a namespace attribute set that way could
            // receive any value the filters make of their arguments.
            if s.filter.is_some() && assigns_attribute(&s.target) {
                found.unchecked =
                    Some("a `{% set %}` block that assigns a namespace attribute cannot filter");
            }
            if let Some(filter) = &s.filter {
                visit_expr(filter, found);
            }
            visit_body(&s.body, found);
        }
        Stmt::AutoEscape(a) => {
            visit_expr(&a.enabled, found);
            visit_body(&a.body, found);
        }
        Stmt::FilterBlock(f) => {
            visit_expr(&f.filter, found);
            visit_body(&f.body, found);
        }
        Stmt::Block(b) => visit_body(&b.body, found),
        Stmt::Import(i) => {
            visit_expr(&i.expr, found);
        }
        Stmt::FromImport(i) => {
            visit_expr(&i.expr, found);
        }
        Stmt::Extends(e) => {
            visit_expr(&e.name, found);
        }
        Stmt::Include(i) => {
            visit_expr(&i.name, found);
        }
        Stmt::Macro(m) => {
            visit_exprs(&m.defaults, found);
            visit_body(&m.body, found);
        }
        // `{% call %}` and `{% do %}` take a call as syntax: its arguments are checked, the call's
        // result (the block's output, or nothing) is not a value the template keeps.
        Stmt::CallBlock(c) => {
            visit_expr(&c.call.expr, found);
            visit_args(&c.call.args, found);
            visit_exprs(&c.macro_decl.defaults, found);
            visit_body(&c.macro_decl.body, found);
        }
        Stmt::Do(d) => {
            visit_expr(&d.call.expr, found);
            visit_args(&d.call.args, found);
        }
    }
}

fn visit_body(body: &[Stmt<'_>], found: &mut Found<'_>) {
    for stmt in body {
        visit_stmt(stmt, found);
    }
}

fn visit_exprs(exprs: &[Expr<'_>], found: &mut Found<'_>) -> Option<Range> {
    exprs.iter().fold(None, |range, expr| cover_all(range, Some(visit_expr(expr, found))))
}

fn visit_args(args: &[CallArg<'_>], found: &mut Found<'_>) -> Option<Range> {
    args.iter().fold(None, |range, arg| match arg {
        CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => {
            cover_all(range, Some(visit_expr(e, found)))
        }
    })
}

/// The byte range an expression covers in the template, after appending the builders in it.
fn visit_expr(expr: &Expr<'_>, found: &mut Found<'_>) -> Range {
    use minijinja::machinery::ast::BinOpKind;
    // (own span, whether it builds a value, children's range)
    let (span, builds, children) = match expr {
        Expr::Var(v) => (v.span(), false, None),
        Expr::Const(c) => (c.span(), false, None),
        Expr::Slice(s) => {
            let mut range = visit_expr(&s.expr, found);
            for part in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                range = range.cover(visit_expr(part, found));
            }
            (s.span(), false, Some(range))
        }
        Expr::UnaryOp(u) => (u.span(), false, Some(visit_expr(&u.expr, found))),
        Expr::BinOp(b) => {
            let grows = matches!(b.op, BinOpKind::Mul | BinOpKind::Add | BinOpKind::Concat);
            let range = visit_expr(&b.left, found).cover(visit_expr(&b.right, found));
            (b.span(), grows, Some(range))
        }
        Expr::Compare(c) => {
            let mut range = visit_expr(&c.expr, found);
            for op in &c.ops {
                range = range.cover(visit_expr(&op.expr, found));
            }
            (c.span(), false, Some(range))
        }
        Expr::IfExpr(i) => {
            let mut range = visit_expr(&i.test_expr, found).cover(visit_expr(&i.true_expr, found));
            if let Some(e) = &i.false_expr {
                range = range.cover(visit_expr(e, found));
            }
            (i.span(), false, Some(range))
        }
        // A filter builds a value from its input and arguments (`batch(2, a)` repeats `a`).
        // Without an input it is a filter block's or a set block's, applied to text: no
        // expression to wrap.
        Expr::Filter(f) => {
            let input = f.expr.as_ref().map(|e| visit_expr(e, found));
            let range = cover_all(input, visit_args(&f.args, found));
            (f.span(), f.expr.is_some(), range)
        }
        Expr::Test(t) => {
            let range = cover_all(Some(visit_expr(&t.expr, found)), visit_args(&t.args, found));
            (t.span(), false, range)
        }
        Expr::GetAttr(g) => (g.span(), false, Some(visit_expr(&g.expr, found))),
        Expr::GetItem(g) => {
            let range = visit_expr(&g.expr, found).cover(visit_expr(&g.subscript_expr, found));
            (g.span(), false, Some(range))
        }
        Expr::Call(c) => {
            let range = cover_all(Some(visit_expr(&c.expr, found)), visit_args(&c.args, found));
            (c.span(), true, range)
        }
        Expr::List(l) => (l.span(), true, visit_exprs(&l.items, found)),
        Expr::Tuple(t) => (t.span(), true, visit_exprs(&t.items, found)),
        Expr::Map(m) => {
            let range = cover_all(visit_exprs(&m.keys, found), visit_exprs(&m.values, found));
            (m.span(), true, range)
        }
    };
    let own = Range { start: span.start_offset as usize, end: span.end_offset as usize };
    // A node's own span ends at its last token but need not start at its first: a call's starts
    // at the postfix token before its arguments, a conditional's and a `not in`'s at the token
    // before the whole expression. So only nodes that begin with a token of their own are taken
    // at their own start: names, literals and brackets, and a unary operator whose span starts at
    // its operator. The others start with their first child, and `balanced` adds any
    // parentheses around it.
    let unary_operator_first = matches!(expr, Expr::UnaryOp(_)) && {
        let text = found.source.get(own.start..).unwrap_or_default();
        text.starts_with('-') || text.starts_with("not")
    };
    let starts_with_own_token = unary_operator_first
        || matches!(expr, Expr::Var(_) | Expr::Const(_) | Expr::List(_) | Expr::Map(_) | Expr::Tuple(_));
    let range = match children {
        Some(children) if starts_with_own_token => children.cover(own),
        Some(children) => Range { start: children.start, end: children.end.max(own.end) },
        None => own,
    };
    if builds {
        found.push(range, CHECK_FUNCTION);
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
