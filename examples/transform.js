// A user-supplied transform: the record is the global `input`; the completion value is the result.
const total = input.items.reduce((sum, item) => sum + item.price * item.qty, 0);
({ id: input.id, total: Math.round(total * 100) / 100, big: total > 100 })
