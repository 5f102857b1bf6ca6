//! The Linux backend (rtnetlink; named network namespaces under
//! `/run/netns`). Written in the next step.
