//! Read planning: the properties of one device become as few Modbus requests
//! as the protocol allows.
//!
//! Properties of the same data table whose ranges touch, overlap or lie at most
//! `max_gap` items apart share one request, as long as the request stays within
//! Modbus' limit (125 registers, 2000 bits). tokio-modbus does not enforce that
//! limit, so the plan does: a request past it would be refused by a device.

use super::visitor::{ModbusVisitor, Register};

/// One read request and the properties it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// The data table.
    pub register: Register,
    /// The first address read.
    pub start: u16,
    /// How many items are read.
    pub count: u16,
    /// Indices (into the slice given to [`plan_reads`]) of the properties
    /// this request serves.
    pub members: Vec<usize>,
}

impl ReadRequest {
    /// The range of `registers` (the request's answer) that holds a visitor's
    /// value.
    pub fn slice_of(&self, visitor: &ModbusVisitor) -> std::ops::Range<usize> {
        let from = usize::from(visitor.offset - self.start);
        from..from + usize::from(visitor.limit)
    }
}

/// Groups visitors into requests. `max_gap` is how many unused items a request
/// may read between two properties to save a request (0: only touching or
/// overlapping ranges merge).
pub fn plan_reads(visitors: &[&ModbusVisitor], max_gap: u16) -> Vec<ReadRequest> {
    let mut order: Vec<usize> = (0..visitors.len()).collect();
    order.sort_by_key(|&i| (visitors[i].register, visitors[i].offset, visitors[i].limit));
    let mut requests: Vec<ReadRequest> = Vec::new();
    for i in order {
        let v = visitors[i];
        let end = u32::from(v.offset) + u32::from(v.limit);
        if let Some(last) = requests.last_mut() {
            let last_end = u32::from(last.start) + u32::from(last.count);
            let new_end = last_end.max(end);
            if last.register == v.register
                && u32::from(v.offset) <= last_end + u32::from(max_gap)
                && new_end - u32::from(last.start) <= u32::from(v.register.max_per_read())
            {
                #[allow(clippy::cast_possible_truncation)]
                {
                    last.count = (new_end - u32::from(last.start)) as u16;
                }
                last.members.push(i);
                continue;
            }
        }
        requests.push(ReadRequest {
            register: v.register,
            start: v.offset,
            count: v.limit,
            members: vec![i],
        });
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(offset: u16, limit: u16) -> ModbusVisitor {
        ModbusVisitor::new(Register::Holding, offset, limit)
    }

    #[test]
    fn contiguous_registers_merge() {
        let vs: Vec<ModbusVisitor> = (0..50).rev().map(|i| h(i * 2, 2)).collect();
        let refs: Vec<&ModbusVisitor> = vs.iter().collect();
        let plan = plan_reads(&refs, 0);
        assert_eq!(plan.len(), 1);
        assert_eq!(
            (plan[0].start, plan[0].count, plan[0].members.len()),
            (0, 100, 50)
        );
        assert_eq!(plan[0].slice_of(&vs[0]), 98..100);
    }

    #[test]
    fn the_125_register_limit_splits_requests() {
        let vs: Vec<ModbusVisitor> = (0..130).map(|i| h(i, 1)).collect();
        let refs: Vec<&ModbusVisitor> = vs.iter().collect();
        let plan = plan_reads(&refs, 0);
        assert_eq!(
            plan.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![125, 5]
        );
        // A value never straddles two requests.
        let vs = [h(0, 124), h(124, 2)];
        let plan = plan_reads(&[&vs[0], &vs[1]], 0);
        assert_eq!(
            plan.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            vec![(0, 124), (124, 2)]
        );
    }

    #[test]
    fn gaps_tables_and_overlaps() {
        let vs = [
            h(0, 1),
            h(3, 1),
            h(0, 2),
            ModbusVisitor::new(Register::Input, 1, 1),
            ModbusVisitor::new(Register::Coil, 0, 1),
            ModbusVisitor::new(Register::Coil, 1, 1),
        ];
        let refs: Vec<&ModbusVisitor> = vs.iter().collect();
        let plan = plan_reads(&refs, 0);
        let shape: Vec<_> = plan
            .iter()
            .map(|r| (r.register, r.start, r.count))
            .collect();
        assert_eq!(
            shape,
            vec![
                (Register::Coil, 0, 2),
                (Register::Holding, 0, 2),
                (Register::Holding, 3, 1),
                (Register::Input, 1, 1)
            ]
        );
        let plan = plan_reads(&refs, 1);
        assert_eq!(plan.len(), 3, "a gap of one register merges when allowed");
    }
}
