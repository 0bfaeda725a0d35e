//! The dependency DAG between checks: validation (unknown dependencies, cycles named in full),
//! topological order, and dependency suppression.
//!
//! When a dependency is unhealthy, its dependents are reported `Unhealthy` with the root cause
//! named — "dependency postgres" — instead of each raising its own alarm: one outage, one
//! root cause. Only `Unhealthy` suppresses; an `Unknown` or `Degraded` dependency leaves its
//! dependents to their own results.
//!
//! ```
//! use ha_core::Status;
//! use ha_health::graph::{DependencyGraph, Resolved};
//!
//! let graph = DependencyGraph::new([
//!     ("postgres", vec![]),
//!     ("api", vec!["postgres".to_owned()]),
//!     ("web", vec!["api".to_owned()]),
//! ])?;
//! let own = [Status::Unhealthy, Status::Healthy, Status::Healthy];
//! let resolved = graph.resolve_all(&own);
//! // `web` depends on `api`, which is up itself, but the root cause is named: postgres.
//! assert_eq!(resolved[2], Resolved { status: Status::Unhealthy, root_cause: Some(0) });
//! assert_eq!(graph.name(0), "postgres");
//! # Ok::<(), ha_health::Error>(())
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use ha_core::Status;
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::Error;

/// Checks and the checks each one depends on, validated: every dependency exists, names are
/// unique and there is no cycle.
///
/// Nodes are numbered in registration order; [`DependencyGraph::order`] lists them with every
/// dependency before its dependents and otherwise in registration order.
#[derive(Debug, Clone)]
pub struct DependencyGraph {
    names: Vec<String>,
    dependencies: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    order: Vec<usize>,
    rank: Vec<usize>,
}

/// The status a check is reported with once its dependencies are taken into account.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Resolved {
    /// The reported status.
    pub status: Status,
    /// When a dependency's failure is the reason: the node whose own check failed (the root
    /// cause, however deep), never this node itself.
    pub root_cause: Option<usize>,
}

impl DependencyGraph {
    /// Validates `checks` (name, direct dependencies) and builds the graph.
    ///
    /// Fails with [`Error::DuplicateCheck`], [`Error::UnknownDependency`], or
    /// [`Error::DependencyCycle`] naming every check on one cycle.
    pub fn new<N, D>(checks: impl IntoIterator<Item = (N, D)>) -> Result<Self, Error>
    where
        N: Into<String>,
        D: IntoIterator,
        D::Item: AsRef<str>,
    {
        let mut names = Vec::new();
        let mut declared = Vec::new();
        for (name, deps) in checks {
            names.push(name.into());
            declared.push(
                deps.into_iter()
                    .map(|d| d.as_ref().to_owned())
                    .collect::<Vec<_>>(),
            );
        }
        let mut index = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if index.insert(name.as_str(), i).is_some() {
                return Err(Error::DuplicateCheck { name: name.clone() });
            }
        }
        let mut dependencies = vec![Vec::new(); names.len()];
        let mut dependents = vec![Vec::new(); names.len()];
        for (i, deps) in declared.iter().enumerate() {
            for dep in deps {
                let Some(&d) = index.get(dep.as_str()) else {
                    return Err(Error::UnknownDependency {
                        check: names[i].clone(),
                        dependency: dep.clone(),
                    });
                };
                if !dependencies[i].contains(&d) {
                    dependencies[i].push(d);
                    dependents[d].push(i);
                }
            }
        }

        let Some(order) = stable_order(&dependencies, &dependents) else {
            let cycle = find_cycle(&dependents);
            return Err(Error::DependencyCycle {
                cycle: cycle.into_iter().map(|i| names[i].clone()).collect(),
            });
        };
        let mut rank = vec![0; names.len()];
        for (pos, &i) in order.iter().enumerate() {
            rank[i] = pos;
        }
        Ok(Self {
            names,
            dependencies,
            dependents,
            order,
            rank,
        })
    }

    /// How many checks.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no checks.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The name of node `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The direct dependencies of node `i`, in declaration order.
    pub fn dependencies(&self, i: usize) -> &[usize] {
        &self.dependencies[i]
    }

    /// Every node, dependencies before dependents, otherwise in registration order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Node `i` and everything that depends on it, directly or not, in topological order:
    /// the nodes whose resolved status may change when `i`'s own status does.
    pub fn affected_by(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.len()];
        let mut found = vec![i];
        seen[i] = true;
        let mut queue = VecDeque::from([i]);
        while let Some(n) = queue.pop_front() {
            for &m in &self.dependents[n] {
                if !std::mem::replace(&mut seen[m], true) {
                    found.push(m);
                    queue.push_back(m);
                }
            }
        }
        found.sort_by_key(|&n| self.rank[n]);
        found
    }

    /// Every node `i` depends on, directly or not, in index order (the other direction of
    /// [`affected_by`](Self::affected_by)).
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.len()];
        let mut stack = self.dependencies[i].clone();
        while let Some(d) = stack.pop() {
            if !std::mem::replace(&mut seen[d], true) {
                stack.extend_from_slice(&self.dependencies[d]);
            }
        }
        (0..self.len()).filter(|&d| seen[d]).collect()
    }

    /// The resolved status of node `i` from its own status and its dependencies' resolved
    /// statuses (which must be current: resolve in [`order`](Self::order)).
    ///
    /// The first unhealthy dependency in declaration order gives the root cause: its own
    /// root cause if it is suppressed itself, else the dependency.
    pub fn resolve(&self, i: usize, own: Status, resolved: &[Resolved]) -> Resolved {
        self.dependencies[i]
            .iter()
            .find(|&&d| resolved[d].status == Status::Unhealthy)
            .map_or(
                Resolved {
                    status: own,
                    root_cause: None,
                },
                |&d| Resolved {
                    status: Status::Unhealthy,
                    root_cause: Some(resolved[d].root_cause.unwrap_or(d)),
                },
            )
    }

    /// Resolves every node from the own statuses `own` (indexed by node).
    pub fn resolve_all(&self, own: &[Status]) -> Vec<Resolved> {
        let mut resolved = vec![
            Resolved {
                status: Status::Unknown,
                root_cause: None
            };
            self.len()
        ];
        for &i in &self.order {
            resolved[i] = self.resolve(i, own[i], &resolved);
        }
        resolved
    }
}

/// A cycle as `a -> b -> c -> a`: each name depends on the next, the last on the first (the
/// order of [`Error::DependencyCycle`]).
pub fn describe_cycle(cycle: &[String]) -> String {
    let mut text = cycle.join(" -> ");
    if let Some(first) = cycle.first() {
        text.push_str(" -> ");
        text.push_str(first);
    }
    text
}

/// Kahn's algorithm taking the lowest-numbered ready node first: dependencies before
/// dependents, otherwise registration order. `None` if there is a cycle.
fn stable_order(dependencies: &[Vec<usize>], dependents: &[Vec<usize>]) -> Option<Vec<usize>> {
    let mut waiting: Vec<usize> = dependencies.iter().map(Vec::len).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..dependencies.len())
        .filter(|&i| waiting[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(dependencies.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &dependents[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    (order.len() == dependencies.len()).then_some(order)
}

/// One cycle, as nodes in dependency order (`a` depends on `b` … depends on `a`), from a graph
/// that has one.
fn find_cycle(dependents: &[Vec<usize>]) -> Vec<usize> {
    // Edges point from a dependency to its dependents.
    let mut graph = DiGraph::<usize, ()>::with_capacity(dependents.len(), 0);
    let nodes: Vec<NodeIndex> = (0..dependents.len()).map(|i| graph.add_node(i)).collect();
    for (d, users) in dependents.iter().enumerate() {
        for &i in users {
            graph.add_edge(nodes[d], nodes[i], ());
        }
    }
    // A cycle lies inside a strongly connected component with more than one node, or is a
    // self-loop.
    for scc in tarjan_scc(&graph) {
        let members: Vec<usize> = scc.iter().map(|&n| graph[n]).collect();
        let start = members[0];
        if members.len() == 1 {
            if dependents[start].contains(&start) {
                return vec![start];
            }
            continue;
        }
        // Breadth-first from `start` back to `start` along dependent edges inside the
        // component: the shortest cycle through `start`.
        let mut parent: HashMap<usize, usize> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        while let Some(n) = queue.pop_front() {
            for &m in &dependents[n] {
                if !members.contains(&m) {
                    continue;
                }
                if m == start {
                    let mut path = vec![n];
                    let mut at = n;
                    while at != start {
                        at = parent[&at];
                        path.push(at);
                    }
                    // `path` runs back along dependent edges, i.e. each depends on the next.
                    return path;
                }
                if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(m) {
                    e.insert(n);
                    queue.push_back(m);
                }
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn graph(edges: &[(&str, &[&str])]) -> Result<DependencyGraph, Error> {
        DependencyGraph::new(edges.iter().map(|(n, d)| (*n, d.iter().copied())))
    }

    #[test]
    fn unknown_dependency_is_named() {
        let err = graph(&[("api", &["db"])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "check `api` depends on `db`, which is not registered"
        );
    }

    #[test]
    fn duplicate_name_is_rejected() {
        let err = graph(&[("db", &[]), ("db", &[])]).unwrap_err();
        assert!(matches!(err, Error::DuplicateCheck { name } if name == "db"));
    }

    #[test]
    fn cycle_is_named_in_full() {
        let err = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]).unwrap_err();
        let Error::DependencyCycle { cycle } = &err else {
            panic!("{err}")
        };
        assert_eq!(cycle.len(), 3);
        assert!(err.to_string().contains(" -> "), "{err}");
        let self_loop = graph(&[("a", &["a"])]).unwrap_err();
        assert_eq!(
            self_loop.to_string(),
            "checks depend on each other in a cycle: a -> a"
        );
    }

    #[test]
    fn root_cause_is_the_deepest_failed_check() {
        let g = graph(&[
            ("db", &[]),
            ("cache", &[]),
            ("api", &["cache", "db"]),
            ("web", &["api"]),
        ])
        .unwrap();
        let own = [
            Status::Unhealthy,
            Status::Healthy,
            Status::Unhealthy,
            Status::Healthy,
        ];
        let r = g.resolve_all(&own);
        assert_eq!(r[2].root_cause, Some(0), "api fails because of db");
        assert_eq!(r[3].root_cause, Some(0), "web names db, not api");
        assert_eq!(r[1].status, Status::Healthy);
        assert_eq!(g.affected_by(0), vec![0, 2, 3]);
    }

    #[test]
    fn order_keeps_registration_order_where_dependencies_allow() {
        let g = graph(&[
            ("web", &["api"]),
            ("cache", &[]),
            ("api", &[]),
            ("cron", &[]),
        ])
        .unwrap();
        let names: Vec<_> = g.order().iter().map(|&i| g.name(i)).collect();
        assert_eq!(names, ["cache", "api", "web", "cron"]);
    }

    /// A random DAG: node `i` may depend only on nodes placed before it in a random
    /// permutation, so there is never a cycle.
    fn dag() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<Status>)> {
        (1usize..12)
            .prop_flat_map(|n| {
                (
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                    proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n),
                    proptest::collection::vec(proptest::sample::select(Status::ALL.to_vec()), n),
                )
            })
            .prop_map(|(perm, edges, own)| {
                // Position `i` in `perm` may depend on positions before it; names follow
                // `perm`, so registration order is not already topological.
                let n = own.len();
                let mut deps = vec![Vec::new(); n];
                for i in 0..n {
                    deps[perm[i]] = (0..i).filter(|&j| edges[i][j]).map(|j| perm[j]).collect();
                }
                (deps, own)
            })
    }

    fn build(deps: &[Vec<usize>]) -> Result<DependencyGraph, Error> {
        DependencyGraph::new(
            deps.iter()
                .enumerate()
                .map(|(i, d)| (format!("c{i}"), d.iter().map(|j| format!("c{j}")))),
        )
    }

    /// Every node that `i` depends on, directly or not.
    fn ancestors(deps: &[Vec<usize>], i: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack = deps[i].clone();
        while let Some(d) = stack.pop() {
            if !out.contains(&d) {
                out.push(d);
                stack.extend(&deps[d]);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn dags_are_accepted_and_ordered((deps, _own) in dag()) {
            let g = build(&deps).unwrap();
            let pos = |i: usize| g.order().iter().position(|&n| n == i).unwrap();
            prop_assert_eq!(g.order().len(), deps.len());
            for (i, ds) in deps.iter().enumerate() {
                for &d in ds {
                    prop_assert!(pos(d) < pos(i), "dependency c{} after c{}", d, i);
                }
            }
        }

        #[test]
        fn a_back_edge_is_always_rejected_and_the_cycle_is_real(
            (mut deps, _own) in dag(),
            pick in any::<proptest::sample::Index>(),
        ) {
            // Pick an edge i -> d (i depends on d) and add d -> i: now there is a cycle.
            let edges: Vec<(usize, usize)> = deps.iter().enumerate()
                .flat_map(|(i, ds)| ds.iter().map(move |&d| (i, d))).collect();
            let (i, d) = if edges.is_empty() { (0, 0) } else { edges[pick.index(edges.len())] };
            deps[d].push(i);
            let err = build(&deps).unwrap_err();
            let Error::DependencyCycle { cycle } = err else { panic!("not a cycle error") };
            prop_assert!(!cycle.is_empty());
            let idx = |name: &str| name[1..].parse::<usize>().unwrap();
            for k in 0..cycle.len() {
                let (a, b) = (idx(&cycle[k]), idx(&cycle[(k + 1) % cycle.len()]));
                prop_assert!(deps[a].contains(&b), "{} does not depend on {}", a, b);
            }
        }

        #[test]
        fn a_down_node_marks_all_its_dependents((deps, own) in dag()) {
            let g = build(&deps).unwrap();
            let r = g.resolve_all(&own);
            for i in 0..deps.len() {
                let down: Vec<usize> = ancestors(&deps, i).into_iter()
                    .filter(|&a| own[a] == Status::Unhealthy).collect();
                if down.is_empty() {
                    prop_assert_eq!(r[i], Resolved { status: own[i], root_cause: None });
                } else {
                    prop_assert_eq!(r[i].status, Status::Unhealthy);
                    let root = r[i].root_cause.unwrap();
                    prop_assert!(down.contains(&root), "root c{} is not a failed ancestor", root);
                    prop_assert_eq!(r[root].root_cause, None, "the root is not suppressed itself");
                }
            }
        }

        #[test]
        fn incremental_resolution_matches_full((deps, own) in dag(), flip in any::<proptest::sample::Index>(), to in proptest::sample::select(Status::ALL.to_vec())) {
            let g = build(&deps).unwrap();
            let mut r = g.resolve_all(&own);
            let mut own = own;
            let i = flip.index(own.len());
            own[i] = to;
            for n in g.affected_by(i) {
                r[n] = g.resolve(n, own[n], &r);
            }
            prop_assert_eq!(r, g.resolve_all(&own));
        }
    }
}
